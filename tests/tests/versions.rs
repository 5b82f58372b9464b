//! Dependency versions: a catalog entry names the dependency a target
//! belongs to and the versions it affects, and a target is watched only in
//! the processes whose installed version is affected, read from their own
//! `sys.path`. The environments are real installs from PyPI that xtask
//! makes (`DETECTOR_TEST_VERSIONS`): `six` 1.16.0 and 1.17.0 in two
//! virtualenvs, 1.16.0 as a `--user` install and in a zipapp, and an
//! editable install.

use std::path::PathBuf;

use detector::{
    agent::{
        exposure::Exposure,
        report::{AttachedReport, TargetStrategy},
    },
    cli::targets::TargetsReport,
};
use detector_tests::{
    Dump, Fixture,
    interpreters::{dist_environments as environments, dist_venv as venv},
    pyenv, spawn_with_env,
};
use serde_json::{Value, json};

const SIX: &str = "six:ensure_str";
const DEMO: &str = "editable_demo:f";

/// A catalog file whose entries affect `six` before 1.17.0 and
/// `editable-demo` before 0.4.
fn catalog() -> PathBuf {
    let entries = json!({"targets": [
        {"id": "vuln-six", "targets": [SIX], "lang": "python", "dependency_name": "six",
         "package_versions": ["<1.17.0"], "vulnerability": {"id": "CVE-0000-0001", "severity": "LOW"}},
        {"id": "vuln-demo", "targets": [DEMO], "lang": "python", "dependency_name": "Editable_Demo",
         "package_versions": [">=0.1,<0.4"]},
    ]});
    let file = std::env::temp_dir().join(format!("detector-versions-{}.json", std::process::id()));
    std::fs::write(&file, entries.to_string()).unwrap();
    file
}

/// `run` on `pids`, counting every call, with `strategy`.
fn run(pids: &[u32], strategy: &str) -> Dump {
    let mut args: Vec<String> =
        ["run", "--no-rc", "--events", "json", "--reachability", "false", "--strategy", strategy]
            .into_iter()
            .map(String::from)
            .collect();
    args.extend(["--targets".into(), catalog().display().to_string()]);
    for pid in pids {
        args.extend(["--pid".into(), pid.to_string()]);
    }
    spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "true")])
}

fn attached(dump: &mut Dump, pid: u32) -> AttachedReport {
    let line = dump.wait_match("attached line", |v| v["type"] == "attached" && v["pid"] == pid);
    serde_json::from_value(line).unwrap()
}

fn hits_of(hits: &[Value], pid: u32, target: &str) -> usize {
    hits.iter().filter(|h| h["pid"] == pid && h["target"] == target).count()
}

fn six(version: &str) -> Exposure {
    Exposure::Affected { dependency: "six".into(), version: version.into() }
}

#[test]
fn only_processes_running_an_affected_version_are_watched() {
    let mut old = Fixture::start(&venv("old"), "dist_calls");
    let mut new = Fixture::start(&venv("new"), "dist_calls");
    old.go();
    new.go();
    for strategy in ["per-call", "watch"] {
        let mut dump = run(&[old.pid(), new.pid()], strategy);
        let a = attached(&mut dump, old.pid());
        assert_eq!(a.process.exposures[SIX], six("1.16.0"), "{strategy}: {a:?}");
        assert_ne!(a.target_strategies[SIX], TargetStrategy::Unwatched, "{strategy}: {a:?}");
        let b = attached(&mut dump, new.pid());
        let not = Exposure::NotAffected { dependency: "six".into(), version: "1.17.0".into() };
        assert_eq!(b.process.exposures[SIX], not, "{strategy}: {b:?}");
        assert_eq!(b.target_strategies[SIX], TargetStrategy::Unwatched, "{strategy}: {b:?}");
        // Not installed in either: watched, and flagged.
        let missing = Exposure::NotInstalled { dependency: "Editable_Demo".into() };
        assert_eq!(b.process.exposures[DEMO], missing, "{strategy}: {b:?}");
        old.call("six", 3);
        new.call("six", 4);
        dump.wait_hits(SIX, 3);
        let s = dump.stop();
        assert_eq!(hits_of(&s.hits, old.pid(), SIX), 3, "{strategy}");
        assert_eq!(hits_of(&s.hits, new.pid(), SIX), 0, "{strategy}");
    }
    old.finish();
    new.finish();
}

#[test]
fn user_and_editable_installs_are_found_where_the_process_looks() {
    let userbase = environments().join("userbase").display().to_string();
    let mut user = Fixture::start_with_env(&pyenv(12), "dist_calls", &[("PYTHONUSERBASE", &userbase)]);
    let mut editable = Fixture::start(&venv("editable"), "dist_calls");
    user.go();
    editable.go();
    let mut dump = run(&[user.pid(), editable.pid()], "watch");
    let u = attached(&mut dump, user.pid());
    assert_eq!(u.process.exposures[SIX], six("1.16.0"), "{u:?}");
    let e = attached(&mut dump, editable.pid());
    let demo = Exposure::Affected { dependency: "Editable_Demo".into(), version: "0.3.0".into() };
    assert_eq!(e.process.exposures[DEMO], demo, "{e:?}");
    user.call("six", 2);
    editable.call("demo", 5);
    dump.wait_hits(DEMO, 5);
    let s = dump.stop();
    assert_eq!(hits_of(&s.hits, user.pid(), SIX), 2);
    // Each hit says what made it count.
    let first = s.hits.iter().find(|h| h["pid"] == user.pid()).unwrap();
    assert_eq!(serde_json::from_value::<Exposure>(first["exposure"].clone()).unwrap(), six("1.16.0"));
    assert_eq!(hits_of(&s.hits, editable.pid(), DEMO), 5);
    user.finish();
    editable.finish();
}

#[test]
fn the_targets_command_shows_a_process_decision() {
    let new = Fixture::start(&venv("new"), "dist_calls");
    let out = std::process::Command::new(detector_tests::detector_bin())
        .args(["targets", "--no-rc", "--format", "json", "--targets"])
        .arg(catalog())
        .args(["--pid", &new.pid().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: TargetsReport = serde_json::from_slice(&out.stdout).unwrap();
    let six = report.targets.iter().find(|t| t.target == SIX).unwrap();
    let not = Exposure::NotAffected { dependency: "six".into(), version: "1.17.0".into() };
    assert_eq!(six.exposure, Some(not));
    let process = report.process.unwrap();
    assert_eq!(process.pid, new.pid());
    assert!(process.dependencies.contains_key("editable-demo"), "{:?}", process.dependencies);
    new.finish();
}

#[test]
fn a_dependency_found_after_the_attach_is_decided_again() {
    let site = environments().join("new/lib/python3.12/site-packages").display().to_string();
    // Under watch its module's body arms the target (watched while not
    // installed), and the later decision disarms it.
    for strategy in ["per-call", "watch"] {
        let mut app = Fixture::start_with_env(&pyenv(12), "dist_calls", &[("DIST_PATH", &site)]);
        app.go();
        let mut dump = run(&[app.pid()], strategy);
        let a = attached(&mut dump, app.pid());
        // Not on its path yet: watched, and flagged.
        let missing = Exposure::NotInstalled { dependency: "six".into() };
        assert_eq!(a.process.exposures[SIX], missing, "{strategy}: {a:?}");
        app.call("adopt", 1);
        // Other targets' decisions may be printed too, as they are made.
        let six_line = |v: &Value| v["type"] == "exposure" && v["pid"] == app.pid() && v["target"] == SIX;
        let line =
            dump.wait_match("exposure line for six", |v| six_line(v) && v["exposure"]["state"] == "not_affected");
        let not = Exposure::NotAffected { dependency: "six".into(), version: "1.17.0".into() };
        assert_eq!(serde_json::from_value::<Exposure>(line["exposure"].clone()).unwrap(), not, "{strategy}");
        app.call("six", 3);
        let s = dump.stop();
        assert_eq!(hits_of(&s.hits, app.pid(), SIX), 0, "{strategy}");
        app.finish();
    }
}

#[test]
fn a_zipapp_s_dependencies_are_read_inside_the_archive() {
    let archive = environments().join("app.pyz").display().to_string();
    let mut app = Fixture::start_with_env(&pyenv(12), "dist_calls", &[("PYTHONPATH", &archive)]);
    app.go();
    let mut dump = run(&[app.pid()], "watch");
    let a = attached(&mut dump, app.pid());
    assert_eq!(a.process.exposures[SIX], six("1.16.0"), "{a:?}");
    app.call("six", 2);
    dump.wait_hits(SIX, 2);
    let s = dump.stop();
    assert_eq!(hits_of(&s.hits, app.pid(), SIX), 2);
    app.finish();
}
