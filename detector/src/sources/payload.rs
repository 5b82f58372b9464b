//! `SCA_DETECTION` payloads, in the three shapes Remote Configuration and
//! local files use:
//!
//! - `{"targets": ["pkg.mod:Qual.name", ...]}`
//! - `{"sca_instrumentation": {"targets": [...]}}`
//! - a reachability entry `{"id", "targets", "dependency_name",
//!   "package_versions", "vulnerability"}`, or a list of them.
//!
//! A payload with anything invalid is rejected as a whole, with the reason.

use serde_json::Value;

use crate::targets::Target;

/// Most targets one payload may name.
pub const MAX_TARGETS: usize = 4096;

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

fn err(msg: impl Into<String>) -> PayloadError {
    PayloadError(msg.into())
}

/// The targets a payload names, deduplicated, in order of appearance.
pub fn parse(bytes: &[u8]) -> Result<Vec<Target>, PayloadError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let mut out = Targets::default();
    match &value {
        Value::Object(o) if o.contains_key("sca_instrumentation") => {
            let inner =
                o["sca_instrumentation"].as_object().ok_or_else(|| err("`sca_instrumentation` must be an object"))?;
            collect(inner.get("targets"), "sca_instrumentation.targets", &mut out)?;
        }
        Value::Object(o) if o.contains_key("id") || o.contains_key("dependency_name") => entry(&value, "", &mut out)?,
        Value::Object(o) if o.contains_key("targets") => collect(o.get("targets"), "targets", &mut out)?,
        Value::Array(entries) => {
            for (i, e) in entries.iter().enumerate() {
                entry(e, &format!("[{i}]"), &mut out)?;
            }
        }
        _ => {
            return Err(err(
                "expected {\"targets\": [...]}, {\"sca_instrumentation\": {\"targets\": [...]}}, or reachability entries",
            ));
        }
    }
    Ok(out.list)
}

/// Targets in order of appearance, each once.
#[derive(Default)]
struct Targets {
    list: Vec<Target>,
    seen: std::collections::HashSet<Target>,
}

/// One reachability entry.
fn entry(e: &Value, at: &str, out: &mut Targets) -> Result<(), PayloadError> {
    let o = e.as_object().ok_or_else(|| err(format!("entry {at} must be an object")))?;
    for (field, ok) in [
        ("id", o.get("id").is_none_or(Value::is_string)),
        ("dependency_name", o.get("dependency_name").is_none_or(Value::is_string)),
        ("package_versions", o.get("package_versions").is_none_or(Value::is_array)),
        ("vulnerability", o.get("vulnerability").is_none_or(|v| v.is_object() || v.is_null())),
    ] {
        if !ok {
            return Err(err(format!("entry {at}: `{field}` has the wrong type")));
        }
    }
    let name = if at.is_empty() { "targets".to_owned() } else { format!("{at}.targets") };
    collect(o.get("targets"), &name, out)
}

/// Appends the targets of a `targets` array.
fn collect(v: Option<&Value>, at: &str, out: &mut Targets) -> Result<(), PayloadError> {
    let list = v.ok_or_else(|| err(format!("`{at}` is missing")))?;
    let list = list.as_array().ok_or_else(|| err(format!("`{at}` must be a list of strings")))?;
    // Counted as given, before any is parsed: a payload of a million
    // duplicates is refused as fast as a million distinct targets.
    if out.list.len() + list.len() > MAX_TARGETS {
        return Err(err(format!("more than {MAX_TARGETS} targets")));
    }
    for (i, t) in list.iter().enumerate() {
        let s = t.as_str().ok_or_else(|| err(format!("`{at}[{i}]` must be a string, not {t}")))?;
        let target = Target::parse(s).map_err(|e| err(e.to_string()))?;
        if out.seen.insert(target.clone()) {
            out.list.push(target);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(bytes: &str) -> Vec<String> {
        parse(bytes.as_bytes()).unwrap().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn accepts_the_three_shapes() {
        assert_eq!(names(r#"{"targets": ["a.b:f", "a.b:C.m", "a.b:f"]}"#), ["a.b:f", "a.b:C.m"]);
        assert_eq!(names(r#"{"sca_instrumentation": {"targets": ["m:f"]}}"#), ["m:f"]);
        let entry = r#"{"id": "CVE-1", "targets": ["requests.sessions:Session.send"], "dependency_name": "requests",
                        "package_versions": ["<2.32.0"], "vulnerability": {"cve": "CVE-1"}}"#;
        assert_eq!(names(entry), ["requests.sessions:Session.send"]);
        assert_eq!(
            names(&format!("[{entry}, {{\"id\": \"x\", \"targets\": [\"m:g\"]}}]")),
            ["requests.sessions:Session.send", "m:g"]
        );
        assert_eq!(names(r#"{"targets": []}"#), Vec::<String>::new());
    }

    #[test]
    fn rejects_bad_payloads_with_the_reason() {
        for (payload, reason) in [
            ("{", "invalid JSON"),
            ("42", "expected {\"targets\""),
            (r#"{"targets": "m:f"}"#, "`targets` must be a list of strings"),
            (r#"{"targets": [1]}"#, "`targets[0]` must be a string"),
            (r#"{"targets": ["m:f", "nocolon"]}"#, "exactly one `:`"),
            (r#"{"sca_instrumentation": []}"#, "must be an object"),
            (r#"{"sca_instrumentation": {}}"#, "`sca_instrumentation.targets` is missing"),
            (r#"[{"id": 3, "targets": []}]"#, "entry [0]: `id` has the wrong type"),
            (r#"[{"id": "x"}]"#, "`[0].targets` is missing"),
            (r#"[{"id": "x", "targets": ["m:<locals>"]}]"#, "<locals>"),
        ] {
            let e = parse(payload.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(reason), "{payload}: {e}");
        }
    }
}
