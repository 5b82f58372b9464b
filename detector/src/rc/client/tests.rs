//! The state machine against responses shaped as the Datadog Agent (and
//! `ddapm-test-agent`'s `config/path` helper) sends them.

use serde_json::json;

use super::*;
use crate::rc::protocol::TargetFile;

fn client() -> RcClient {
    RcClient::new(Identity { service: "svc".into(), env: "prod".into(), app_version: "1.2".into() })
}

/// A response holding `files` (path, content), as the agent builds it.
fn response(version: u64, files: &[(&str, &str)]) -> Response {
    let targets: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(path, content)| {
            (
                path.to_string(),
                json!({"custom": {"c": [""], "v": 3}, "hashes": {"sha256": sha256_hex(content.as_bytes())}, "length": content.len()}),
            )
        })
        .collect();
    let signed = json!({
        "signatures": [{"keyid": "", "sig": ""}],
        "signed": {"_type": "targets", "custom": {"opaque_backend_state": "b64state"}, "expires": "2099-01-01T00:00:00Z",
                   "spec_version": "1.0.0", "targets": targets, "version": version},
    });
    Response {
        roots: vec![],
        targets: B64.encode(signed.to_string()),
        target_files: files.iter().map(|(p, c)| TargetFile { path: p.to_string(), raw: B64.encode(c) }).collect(),
        client_configs: files.iter().map(|(p, _)| p.to_string()).collect(),
        config_status: 0,
    }
}

const A: &str = "datadog/2/SCA_DETECTION/cfg-a/config";
const B: &str = "employee/SCA_DETECTION/cfg-b/config";

#[test]
fn the_first_request_carries_the_full_empty_state() {
    let r = client().request();
    assert_eq!(r.client.state.root_version, 1);
    assert_eq!(r.client.state.targets_version, 0);
    assert!(r.client.state.config_states.is_empty() && r.cached_target_files.is_empty());
    assert!(!r.client.state.has_error);
    assert_eq!(r.client.products, ["SCA_DETECTION"]);
    assert!(r.client.is_tracer);
    assert_eq!(r.client.client_tracer.language, "python");
    assert_eq!((r.client.client_tracer.service.as_str(), r.client.client_tracer.env.as_str()), ("svc", "prod"));
    assert_ne!(r.client.id, r.client.client_tracer.runtime_id);
}

#[test]
fn new_unchanged_changed_and_removed_configs() {
    let mut c = client();
    let changes = c.update(response(0, &[(A, r#"{"targets": ["m:f"]}"#)])).unwrap();
    assert_eq!(changes, vec![Change::Put { path: A.into(), raw: br#"{"targets": ["m:f"]}"#.to_vec() }]);
    c.acknowledge(A, Ok(()));
    let r = c.request();
    assert_eq!(r.client.state.backend_client_state, "b64state");
    assert_eq!(r.client.state.config_states.len(), 1);
    let s = &r.client.state.config_states[0];
    assert_eq!((s.id.as_str(), s.version, s.product.as_str(), s.apply_state), ("cfg-a", 3, "SCA_DETECTION", 2));
    assert_eq!(r.cached_target_files[0].path, A);
    assert_eq!(r.cached_target_files[0].hashes[0].hash, sha256_hex(br#"{"targets": ["m:f"]}"#));

    // The same again (targets_version still 0, as some servers leave it): unchanged.
    assert_eq!(c.update(response(0, &[(A, r#"{"targets": ["m:f"]}"#)])).unwrap(), vec![]);
    assert_eq!(c.held()[A].state, ApplyState::Acknowledged);

    // Changed content, and a second config.
    let changes = c.update(response(0, &[(A, r#"{"targets": ["m:g"]}"#), (B, r#"{"targets": []}"#)])).unwrap();
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|ch| matches!(ch, Change::Put { .. })));

    // A dropped from client_configs: removed; B unchanged.
    let changes = c.update(response(1, &[(B, r#"{"targets": []}"#)])).unwrap();
    assert_eq!(changes, vec![Change::Remove { path: A.into() }]);
    assert_eq!(c.request().client.state.targets_version, 1);
}

#[test]
fn an_unchanged_config_need_not_be_sent_again() {
    let mut c = client();
    c.update(response(1, &[(A, r#"{"targets": ["m:f"]}"#)])).unwrap();
    let mut again = response(2, &[(A, r#"{"targets": ["m:f"]}"#)]);
    again.target_files.clear(); // the client said it has it cached
    assert_eq!(c.update(again).unwrap(), vec![]);
}

#[test]
fn a_hash_or_length_mismatch_rejects_everything_and_is_reported() {
    let mut c = client();
    c.update(response(1, &[(A, r#"{"targets": ["m:f"]}"#)])).unwrap();
    c.acknowledge(A, Ok(()));
    let before = c.request();

    let mut bad = response(2, &[(A, r#"{"targets": ["m:g"]}"#), (B, r#"{"targets": ["m:h"]}"#)]);
    bad.target_files[1].raw = B64.encode(r#"{"targets": ["m:X"]}"#); // same length, other hash
    let e = c.update(bad).unwrap_err();
    assert!(e.0.contains("sha256") && e.0.contains(B), "{e}");
    let after = c.request();
    assert_eq!(after.client.state.targets_version, 1, "state unchanged");
    assert_eq!(after.client.state.config_states, before.client.state.config_states);
    assert!(after.client.state.has_error && after.client.state.error.contains("sha256"));

    let mut short = response(2, &[(A, r#"{"targets": ["m:g"]}"#)]);
    short.target_files[0].raw = B64.encode(r#"{"targets": []}"#);
    assert!(c.update(short).unwrap_err().0.contains("length"));

    // A sound response clears the error.
    c.update(response(3, &[(A, r#"{"targets": ["m:f"]}"#)])).unwrap();
    assert!(!c.request().client.state.has_error);
}

#[test]
fn missing_files_and_unsigned_paths_are_rejected() {
    let mut c = client();
    let mut r = response(1, &[(A, "{}")]);
    r.target_files.clear();
    assert!(c.update(r).unwrap_err().0.contains("missing from target_files"));
    let mut r = response(1, &[(A, "{}")]);
    r.client_configs.push(B.into());
    assert!(c.update(r).unwrap_err().0.contains("not in the signed targets"));
    let mut r = response(1, &[(A, "{}")]);
    r.targets = "!!!".into();
    assert!(c.update(r).unwrap_err().0.contains("invalid base64"));
}

#[test]
fn empty_responses_expiry_and_other_products() {
    let mut c = client();
    assert_eq!(c.update(Response::default()).unwrap(), vec![]);
    c.update(response(1, &[(A, "{}"), ("datadog/2/ASM_DD/x/config", "{}")])).unwrap();
    assert_eq!(c.held().len(), 1, "other products are not held");
    assert_eq!(c.update(Response::default()).unwrap(), vec![], "{{}}: nothing new");
    assert_eq!(c.held().len(), 1);
    let expired = Response { config_status: 1, ..Response::default() };
    assert_eq!(c.update(expired).unwrap(), vec![Change::Remove { path: A.into() }]);
    assert!(c.held().is_empty());
}

#[test]
fn apply_errors_are_reported_per_config() {
    let mut c = client();
    c.update(response(1, &[(A, "not json"), (B, r#"{"targets": []}"#)])).unwrap();
    c.acknowledge(A, Err("invalid JSON: expected value".into()));
    c.acknowledge(B, Ok(()));
    let states = c.request().client.state.config_states;
    let a = states.iter().find(|s| s.id == "cfg-a").unwrap();
    let b = states.iter().find(|s| s.id == "cfg-b").unwrap();
    assert_eq!((a.apply_state, a.apply_error.as_str()), (3, "invalid JSON: expected value"));
    assert_eq!((b.apply_state, b.apply_error.as_str()), (2, ""));
}

#[test]
fn config_paths() {
    assert_eq!(parse_path(A), Some(("SCA_DETECTION", "cfg-a")));
    assert_eq!(parse_path(B), Some(("SCA_DETECTION", "cfg-b")));
    assert_eq!(parse_path("datadog/2/SCA_DETECTION/x"), None);
    assert_eq!(parse_path("other/a/b/c/d"), None);
}
