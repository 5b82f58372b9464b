//! `SCA_DETECTION` payloads, in the shapes Remote Configuration and local
//! files use:
//!
//! - `{"targets": ["pkg.mod:Qual.name", ...]}`
//! - `{"sca_instrumentation": {"targets": [...]}}`
//! - dd-trace-py's reachability catalog, `{"targets": [entry, ...]}`, an
//!   entry being `{"id", "targets", "lang", "dependency_name",
//!   "package_versions", "vulnerability"}`; or a list of entries, or one.
//!
//! Fields not named here are ignored, so the format can grow. An entry for
//! another language is skipped, with the reason. A payload with anything
//! invalid is rejected as a whole, with the reason.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::catalog::{Advisory, Catalog, Skipped, Vulnerability};
use crate::targets::Target;

/// Most targets one payload may name.
pub const MAX_TARGETS: usize = 4096;

/// The language this agent watches: entries for others are skipped.
const LANG: &str = "python";

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

fn err(msg: impl Into<String>) -> PayloadError {
    PayloadError(msg.into())
}

/// The targets a payload names, deduplicated, in order of appearance, with
/// the advisories of the entries naming them.
pub fn parse(bytes: &[u8]) -> Result<Catalog, PayloadError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let mut out = Parsed::default();
    match &value {
        Value::Object(o) if o.contains_key("sca_instrumentation") => {
            let inner =
                o["sca_instrumentation"].as_object().ok_or_else(|| err("`sca_instrumentation` must be an object"))?;
            collect(inner.get("targets"), "sca_instrumentation.targets", &mut out)?;
        }
        Value::Object(o) if is_entry(o) => entry(o, "", &mut out)?,
        Value::Object(o) if o.contains_key("targets") => collect(o.get("targets"), "targets", &mut out)?,
        Value::Array(entries) => {
            for (i, e) in entries.iter().enumerate() {
                let o = e.as_object().ok_or_else(|| err(format!("entry [{i}] must be an object")))?;
                entry(o, &format!("[{i}]"), &mut out)?;
            }
        }
        _ => {
            return Err(err(
                "expected {\"targets\": [...]}, {\"sca_instrumentation\": {\"targets\": [...]}}, or reachability entries",
            ));
        }
    }
    Ok(out.catalog)
}

/// A catalog being read, and the targets it has, to name each once.
#[derive(Default)]
struct Parsed {
    catalog: Catalog,
    seen: HashSet<Target>,
    /// Targets read so far, duplicates included.
    read: usize,
}

impl Parsed {
    fn add(&mut self, target: Target, advisory: Option<&Advisory>) {
        if let Some(a) = advisory {
            let advisories = self.catalog.advisories.entry(target.clone()).or_default();
            if !advisories.contains(a) {
                advisories.push(a.clone());
            }
        }
        if self.seen.insert(target.clone()) {
            self.catalog.targets.push(target);
        }
    }
}

/// Whether an object is a catalog entry (not a payload's top level).
fn is_entry(o: &Map<String, Value>) -> bool {
    ["id", "dependency_name", "lang", "package_versions", "vulnerability"].iter().any(|k| o.contains_key(*k))
}

/// One catalog entry at `at`: its targets with its advisory, unless it is
/// for another language.
fn entry(o: &Map<String, Value>, at: &str, out: &mut Parsed) -> Result<(), PayloadError> {
    let text = |field: &str| -> Result<Option<String>, PayloadError> {
        match o.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(format!("entry {at}: `{field}` has the wrong type"))),
        }
    };
    let id = text("id")?;
    if let Some(lang) = text("lang")?.filter(|l| !l.eq_ignore_ascii_case(LANG)) {
        let reason = format!("for {lang}, not {LANG}");
        out.catalog.skipped.push(Skipped { at: display(at), id, reason });
        return Ok(());
    }
    let advisory = Advisory {
        id,
        dependency: text("dependency_name")?,
        versions: versions(o.get("package_versions"), at)?,
        vulnerability: vulnerability(o.get("vulnerability"), at)?,
    };
    let name = if at.is_empty() { "targets".to_owned() } else { format!("{at}.targets") };
    let list = list(o.get("targets"), &name, out)?;
    for (i, t) in list.iter().enumerate() {
        let s = t.as_str().ok_or_else(|| err(format!("`{name}[{i}]` must be a string, not {t}")))?;
        out.add(Target::parse(s).map_err(|e| err(e.to_string()))?, Some(&advisory));
    }
    Ok(())
}

/// Where an entry is, as `detector targets` shows it.
fn display(at: &str) -> String {
    if at.is_empty() { "the payload".into() } else { at.into() }
}

/// `package_versions`: a list of specifier strings.
fn versions(v: Option<&Value>, at: &str) -> Result<Vec<String>, PayloadError> {
    let wrong = || err(format!("entry {at}: `package_versions` must be a list of strings"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => {
            let sets: Vec<String> =
                list.iter().map(|s| s.as_str().map(str::to_owned).ok_or_else(wrong)).collect::<Result<_, _>>()?;
            super::affected::check_specifiers(&sets)
                .map_err(|e| err(format!("entry {at}: `package_versions`: {e}")))?;
            Ok(sets)
        }
        Some(_) => Err(wrong()),
    }
}

/// `vulnerability`: an object, its id, severity and description kept as
/// such and anything else as text.
fn vulnerability(v: Option<&Value>, at: &str) -> Result<Option<Vulnerability>, PayloadError> {
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(err(format!("entry {at}: `vulnerability` has the wrong type"))),
    };
    let mut vuln = Vulnerability::default();
    for (k, v) in o {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match k.as_str() {
            "id" => vuln.id = Some(text),
            "severity" => vuln.severity = Some(text),
            "description" => vuln.description = Some(text),
            _ => {
                vuln.other.insert(k.clone(), text);
            }
        }
    }
    Ok(Some(vuln))
}

/// The array at `at`, counted against [`MAX_TARGETS`] as given, before any
/// is parsed: a payload of a million duplicates is refused as fast as a
/// million distinct targets.
fn list<'v>(v: Option<&'v Value>, at: &str, out: &mut Parsed) -> Result<&'v Vec<Value>, PayloadError> {
    let list = v.ok_or_else(|| err(format!("`{at}` is missing")))?;
    let list = list.as_array().ok_or_else(|| err(format!("`{at}` must be a list")))?;
    out.read += list.len();
    if out.read > MAX_TARGETS {
        return Err(err(format!("more than {MAX_TARGETS} targets")));
    }
    Ok(list)
}

/// A `targets` array: target strings, or catalog entries.
fn collect(v: Option<&Value>, at: &str, out: &mut Parsed) -> Result<(), PayloadError> {
    for (i, t) in list(v, at, out)?.iter().enumerate() {
        match t {
            Value::String(s) => out.add(Target::parse(s).map_err(|e| err(e.to_string()))?, None),
            Value::Object(o) => entry(o, &format!("{at}[{i}]"), out)?,
            other => return Err(err(format!("`{at}[{i}]` must be a target string or an entry, not {other}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(bytes: &str) -> Vec<String> {
        parse(bytes.as_bytes()).unwrap().targets.iter().map(ToString::to_string).collect()
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
            (r#"{"targets": "m:f"}"#, "`targets` must be a list"),
            (r#"{"targets": [1]}"#, "`targets[0]` must be a target string or an entry"),
            (r#"{"targets": [{"id": "x", "targets": [2]}]}"#, "`targets[0].targets[0]` must be a string"),
            (r#"{"targets": [{"id": "x", "package_versions": "<2"}]}"#, "`package_versions` must be a list of strings"),
            (r#"{"targets": [{"id": "x", "targets": [], "package_versions": ["=>2"]}]}"#, "`=>2` is not a PEP 440"),
            (r#"{"targets": [{"id": "x", "lang": 3, "targets": []}]}"#, "`lang` has the wrong type"),
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

#[cfg(test)]
mod catalog_tests {
    use super::*;

    /// dd-trace-py's `_cve_data.json` shape, with a field it may grow.
    const TRACER: &str = r#"{"targets": [
        {"id": "vuln-001", "targets": ["requests.sessions:Session.send"], "lang": "python",
         "dependency_name": "requests", "package_versions": ["<2.32.0"],
         "vulnerability": {"id": "CVE-2024-35195", "severity": "MEDIUM", "description": "cert checks", "cvss": 5.6},
         "added_later": {"any": "thing"}},
        {"id": "vuln-js", "targets": ["x:y"], "lang": "javascript", "dependency_name": "lodash"},
        {"id": "vuln-002", "targets": ["requests.sessions:Session.send", "jinja2.filters:do_xmlattr"],
         "lang": "python", "dependency_name": "Jinja2", "package_versions": ["<3.1.3", ">=4.0,<4.0.1"]}
    ]}"#;

    #[test]
    fn the_tracers_catalog_keeps_each_targets_advisories() {
        let c = parse(TRACER.as_bytes()).unwrap();
        let names: Vec<String> = c.targets.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["requests.sessions:Session.send", "jinja2.filters:do_xmlattr"]);
        let send = &c.advisories[&Target::parse("requests.sessions:Session.send").unwrap()];
        let ids: Vec<_> = send.iter().map(|a| a.id.as_deref().unwrap()).collect();
        assert_eq!(ids, ["vuln-001", "vuln-002"]);
        assert_eq!(send[0].dependency.as_deref(), Some("requests"));
        assert_eq!(send[0].versions, ["<2.32.0"]);
        let vuln = send[0].vulnerability.as_ref().unwrap();
        assert_eq!((vuln.id.as_deref(), vuln.severity.as_deref()), (Some("CVE-2024-35195"), Some("MEDIUM")));
        assert_eq!(vuln.other["cvss"], "5.6");
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(c.skipped[0].id.as_deref(), Some("vuln-js"));
        assert!(c.skipped[0].reason.contains("javascript"), "{:?}", c.skipped[0]);
    }

    #[test]
    fn a_plain_list_has_no_advisories() {
        let c = parse(br#"{"targets": ["m:f"]}"#).unwrap();
        assert!(c.advisories.is_empty() && c.skipped.is_empty());
    }
}
