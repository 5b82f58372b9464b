//! The shipped manifests under `deploy/`, parsed, for the tests that check
//! them offline and those that run the agent as they would.

use std::path::PathBuf;

use yaml_rust2::{Yaml, YamlLoader};

/// The `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

/// Every document of `deploy/detector.yaml`.
pub fn manifests() -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy_dir().join("detector.yaml")).unwrap();
    YamlLoader::load_from_str(&text).expect("deploy/detector.yaml parses")
}

/// The one document of `kind`.
pub fn of_kind(docs: &[Yaml], kind: &str) -> Yaml {
    let found: Vec<&Yaml> = docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0].clone()
}

/// A YAML list of strings.
pub fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The capabilities the DaemonSet's container adds (every other is dropped),
/// as the manifest spells them (`BPF`, `SYS_ADMIN`).
pub fn capabilities() -> Vec<String> {
    let ds = of_kind(&manifests(), "DaemonSet");
    strs(&ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"])
}

/// `setpriv` arguments that run a command with exactly the DaemonSet's
/// capabilities, as uid 0 and with no new privileges, as the container runs.
pub fn setpriv_as_daemonset() -> Vec<String> {
    let caps: Vec<String> = capabilities().iter().map(|c| format!("+{}", c.to_ascii_lowercase())).collect();
    let set = format!("-all,{}", caps.join(","));
    ["setpriv", "--inh-caps", &set, "--ambient-caps", &set, "--bounding-set", &set, "--no-new-privs", "--"]
        .map(String::from)
        .to_vec()
}
