//! The deployment under `deploy/`, checked offline: the manifests parse, the
//! DaemonSet has what a node agent needs and no more than that, and every
//! path, port and option in them is one the agent really uses.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use detector_tests::{
    deploy::{capabilities, deploy_dir, manifests, of_kind, strs},
    detector_bin,
};

/// A string constant's value in the agent's source, e.g. `TRACEFS`.
fn source_const(file: &str, name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../detector/src").join(file);
    let src = std::fs::read_to_string(&path).unwrap();
    let decl = format!("pub const {name}: &str = \"");
    let at = src.find(&decl).unwrap_or_else(|| panic!("no {name} in {}", path.display())) + decl.len();
    src[at..].split('"').next().unwrap().to_owned()
}

#[test]
fn daemonset_runs_on_every_node_with_least_privilege() {
    let ds = of_kind(&manifests(), "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"].as_bool(), Some(true), "host PID namespace: every process in /proc");
    assert_eq!(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]);
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false), "the agent never calls the API");
    // Each one is needed on Linux 6.16+ (see detector/src/privileges.rs and
    // deploy/README.md); `privileges.rs` runs the agent under exactly these.
    let caps: BTreeSet<String> = capabilities().into_iter().collect();
    let want: BTreeSet<String> =
        ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"].map(String::from).into();
    assert_eq!(caps, want, "these and nothing else");
    assert_eq!(strs(&c["args"])[0], "run");
    assert_eq!(c["env"][0]["name"].as_str(), Some("DD_AGENT_HOST"));
    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("status.hostIP"));
    assert_eq!(c["envFrom"][0]["configMapRef"]["name"], of_kind(&manifests(), "ConfigMap")["metadata"]["name"]);
}

#[test]
fn mounts_are_the_paths_the_agent_opens() {
    let docs = manifests();
    let ds = of_kind(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let mount = |name: &str| -> String {
        let m = c["volumeMounts"].as_vec().unwrap().iter().find(|m| m["name"].as_str() == Some(name)).cloned();
        m.unwrap_or_else(|| panic!("no mount {name}"))["mountPath"].as_str().unwrap().to_owned()
    };
    let volume = |name: &str| {
        spec["volumes"].as_vec().unwrap().iter().find(|v| v["name"].as_str() == Some(name)).cloned().unwrap()
    };
    // tracefs: where the agent looks for (and reads) tracepoint formats.
    let tracefs = source_const("bpf/tracefs.rs", "TRACEFS");
    assert_eq!(mount("tracefs"), tracefs);
    assert_eq!(volume("tracefs")["hostPath"]["path"].as_str(), Some(tracefs.as_str()));
    // The tap's socket lives in the mounted directory, the same for `run` and `dump`.
    let tap = source_const("tap.rs", "DEFAULT_PATH");
    let config = of_kind(&docs, "ConfigMap");
    assert_eq!(config["data"]["DETECTOR_TAP"].as_str(), Some(tap.as_str()));
    assert!(tap.starts_with(&format!("{}/", mount("run"))), "{tap} is under the run mount");
    // The metrics port the probes use is the one the agent binds, on the
    // pod's own address.
    let env = c["env"].as_vec().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"].as_str() == Some(name)).cloned();
    let addr = var("DETECTOR_METRICS_ADDR").expect("DETECTOR_METRICS_ADDR in the container's env");
    let addr = addr["value"].as_str().unwrap();
    assert!(addr.starts_with("$(POD_IP):"), "bound to the pod's address: {addr}");
    assert_eq!(var("POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("status.podIP"));
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(c["ports"][0]["containerPort"].as_i64(), Some(port as i64));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some("/healthz"));
        assert_eq!(c[probe]["httpGet"]["port"], c["ports"][0]["name"]);
    }
}

#[test]
fn every_configmap_option_is_one_the_agent_reads() {
    let config = of_kind(&manifests(), "ConfigMap");
    let help = Command::new(detector_bin()).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let known_dd = ["DD_SCA_DETECTION_ENABLED", "DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS"];
    for (k, v) in config["data"].as_hash().unwrap() {
        let k = k.as_str().unwrap();
        assert!(v.as_str().is_some(), "{k}: ConfigMap values are strings");
        if k.starts_with("DETECTOR_") {
            assert!(help.contains(&format!("[env: {k}=")), "`detector run --help` does not read {k}");
        } else {
            assert!(known_dd.contains(&k), "unknown option {k}");
        }
    }
    // Each value parses: the agent starts with the whole ConfigMap as its
    // environment (gate off, so it attaches nothing and waits for SIGTERM).
    let mut agent = Command::new(detector_bin())
        .args(["run", "--no-rc"])
        .envs(config["data"].as_hash().unwrap().iter().map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap())))
        .env("DD_SCA_DETECTION_ENABLED", "false")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(agent.try_wait().unwrap().is_none(), "the agent rejected the ConfigMap");
    detector_tests::signal(agent.id(), libc::SIGTERM);
    assert!(agent.wait().unwrap().success());
}

#[test]
fn dockerfile_builds_with_the_xtask_in_two_stages() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(stages, 2, "a build stage and a runtime stage");
    assert!(text.contains("cargo xtask build"));
    assert!(text.contains("COPY --from=build"));
}
