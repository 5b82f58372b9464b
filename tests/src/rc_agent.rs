//! A real `ddapm-test-agent` (installed from PyPI by `cargo xtask test`):
//! serves `/info` and `/v0.7/config`, lets a test set the configs it sends,
//! and lists the requests it received so a test can assert on the client's
//! reported state.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use detector::telemetry::wire::Envelope;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{STEP_TIMEOUT, free_port};

/// A running test agent on its own ports.
pub struct TestAgent {
    port: u16,
    otlp_ports: (u16, u16),
    child: Option<Child>,
}

impl TestAgent {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Self {
        // It also serves OTLP, on fixed default ports: give those free ones
        // too, so agents can run side by side.
        let mut a = TestAgent { port: free_port(), otlp_ports: (free_port(), free_port()), child: None };
        a.restart();
        a
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it (the port stays reserved for [`TestAgent::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port, with a fresh state.
    pub fn restart(&mut self) {
        self.stop();
        let bin = std::env::var("DETECTOR_TEST_AGENT")
            .expect("DETECTOR_TEST_AGENT is not set: run the integration tests with `cargo xtask test`");
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--host", "127.0.0.1"])
            .args([
                "--otlp-http-port",
                &self.otlp_ports.0.to_string(),
                "--otlp-grpc-port",
                &self.otlp_ports.1.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ddapm-test-agent");
        self.child = Some(child);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while ureq::get(&format!("{}/info", self.url())).call().is_err() {
            assert!(Instant::now() < deadline, "ddapm-test-agent did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `msg` as the only config, at `path` (the agent builds the TUF
    /// targets, with `targets_version` 0).
    pub fn set_config(&self, path: &str, msg: &Value) {
        ureq::post(&format!("{}/test/session/responses/config/path", self.url()))
            .send_json(json!({"path": path, "msg": msg}))
            .unwrap();
    }

    /// Sends `body` as the whole `/v0.7/config` response.
    pub fn set_response(&self, body: &Value) {
        ureq::post(&format!("{}/test/session/responses/config", self.url())).send_json(body).unwrap();
    }

    /// The `/v0.7/config` requests received, oldest first, as JSON.
    pub fn config_requests(&self) -> Vec<Value> {
        let all: Vec<Value> =
            ureq::get(&format!("{}/test/session/requests", self.url())).call().unwrap().into_json().unwrap();
        // Listed oldest first.
        all.into_iter()
            .filter(|r| r["url"].as_str().is_some_and(|u| u.ends_with("/v0.7/config")))
            .filter_map(|r| serde_json::from_slice(&B64.decode(r["body"].as_str()?).ok()?).ok())
            .collect()
    }

    /// The telemetry it received, typed (a body that is not an envelope
    /// fails the test), each runtime's in the order it sent them.
    pub fn telemetry(&self) -> Vec<Envelope> {
        let all: Vec<Value> =
            ureq::get(&format!("{}/test/session/apmtelemetry", self.url())).call().unwrap().into_json().unwrap();
        let mut all: Vec<Envelope> = all
            .into_iter()
            .map(|e| serde_json::from_value(e.clone()).unwrap_or_else(|err| panic!("{err}: {e}")))
            .collect();
        // Not listed in the order received.
        all.sort_by_key(|e| e.seq_id);
        all
    }

    /// Waits until `pred` holds of the telemetry received; returns it.
    pub fn wait_telemetry(&self, what: &str, pred: impl Fn(&[Envelope]) -> bool) -> Vec<Envelope> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let got = self.telemetry();
            if pred(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "no telemetry with {what}; got: {got:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The telemetry requests received, oldest first: each one's headers
    /// (names in lower case) and body.
    pub fn telemetry_requests(&self) -> Vec<(BTreeMap<String, String>, Value)> {
        let all: Vec<Value> =
            ureq::get(&format!("{}/test/session/requests", self.url())).call().unwrap().into_json().unwrap();
        let telemetry = all.into_iter().filter(|r| r["url"].as_str().is_some_and(|u| u.ends_with("/apmtelemetry")));
        telemetry
            .map(|r| {
                let headers = r["headers"].as_object().into_iter().flatten();
                let headers = headers.map(|(k, v)| (k.to_lowercase(), v.as_str().unwrap_or_default().to_owned()));
                let body = B64.decode(r["body"].as_str().unwrap_or_default()).unwrap();
                (headers.collect(), serde_json::from_slice(&body).unwrap())
            })
            .collect()
    }

    /// Waits until the newest request satisfies `pred`; returns it.
    pub fn wait_for_request(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(r) = self.config_requests().pop().filter(|r| pred(r)) {
                return r;
            }
            assert!(Instant::now() < deadline, "no request with {what}; last: {:?}", self.config_requests().pop());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The config states of a request, by config id: `(apply_state, apply_error)`.
pub fn config_states(request: &Value) -> Vec<(String, u64, String)> {
    request["client"]["state"]["config_states"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or_default().to_owned(),
                        s["apply_state"].as_u64().unwrap_or(0),
                        s["apply_error"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The hash the request says it holds for `path`.
pub fn cached_hash(request: &Value, path: &str) -> Option<String> {
    request["cached_target_files"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == path)
        .and_then(|f| f["hashes"][0]["hash"].as_str().map(str::to_owned))
}

/// A full `/v0.7/config` response holding `files` (path, raw content):
/// the signed targets describe each file's true hash and length unless
/// `tamper` replaces the content sent for a path after signing.
pub fn response(version: u64, files: &[(&str, &[u8])], tamper: Option<(&str, &[u8])>) -> Value {
    let targets: serde_json::Map<String, Value> = files
        .iter()
        .map(|(path, raw)| {
            let hash: String = Sha256::digest(raw).iter().map(|b| format!("{b:02x}")).collect();
            (path.to_string(), json!({"custom": {"v": version}, "hashes": {"sha256": hash}, "length": raw.len()}))
        })
        .collect();
    let signed = json!({
        "signatures": [],
        "signed": {"_type": "targets", "custom": {"opaque_backend_state": "c3RhdGU="}, "expires": "2099-01-01T00:00:00Z",
                   "spec_version": "1.0.0", "targets": targets, "version": version},
    });
    let target_files: Vec<Value> = files
        .iter()
        .map(|(path, raw)| {
            let sent = match tamper {
                Some((p, other)) if p == *path => other,
                _ => raw,
            };
            json!({"path": path, "raw": B64.encode(sent)})
        })
        .collect();
    json!({
        "roots": [],
        "targets": B64.encode(signed.to_string()),
        "target_files": target_files,
        "client_configs": files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
    })
}
