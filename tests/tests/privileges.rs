//! The agent under the DaemonSet's own capability set (read from the
//! manifest, applied with `setpriv`) watches a process of another user
//! whose interpreter and code live in a directory only that user can read:
//! the common case of a container image with a non-root user.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, process::Command};

use detector_tests::{
    Interpreter, NodeAgent, deploy,
    node_agent::{one_at_a_time, opted_in},
};

const F: &str = "wl.plain:f";
const UID: u32 = 1000;

#[test]
fn the_daemonsets_capabilities_watch_another_users_process_with_exact_counts() {
    let _turn = one_at_a_time();
    let home = PrivateHome::new();
    let mut agent = NodeAgent::start_wrapped(&deploy::setpriv_as_daemonset(), &[F], &[]);
    assert_eq!(effective_capabilities(agent.pid()), wanted_capabilities(), "the agent runs with the manifest's set");
    let env = opted_in("non-root");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let uid = |pid| status_field(pid, "Uid:").split_whitespace().nth(1).map(str::to_owned);
    let hits = agent.count_plain(&home.interpreter(), &env, |pid| assert_eq!(uid(pid), Some(UID.to_string())));
    assert_eq!(hits, 25);
    agent.events.stop_with(libc::SIGTERM);
}

/// A directory of mode 0700 owned by [`UID`], holding a virtualenv made by
/// that user from Debian's `/usr/bin/python3.11` (copied, not linked) and a
/// copy of the fixtures. Removed when dropped.
struct PrivateHome {
    dir: PathBuf,
}

impl PrivateHome {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("detector-uid{UID}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fixtures = detector_tests::fixtures_dir();
        let copied = Command::new("cp").arg("-r").arg(&fixtures).arg(dir.join("fixtures")).status().unwrap();
        assert!(copied.success());
        let owned = Command::new("chown").args(["-R", &format!("{UID}:{UID}")]).arg(&dir).status().unwrap();
        assert!(owned.success());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let venv = Command::new("setpriv")
            .args(as_user())
            .args(["/usr/bin/python3.11", "-m", "venv", "--copies", "--without-pip"])
            .arg(dir.join("venv"))
            .status()
            .unwrap();
        assert!(venv.success(), "making the virtualenv as uid {UID}");
        PrivateHome { dir }
    }

    /// The virtualenv's interpreter, run as [`UID`].
    fn interpreter(&self) -> Interpreter {
        let mut argv: Vec<String> = ["setpriv"].into_iter().chain(as_user()).map(String::from).collect();
        argv.push(self.dir.join("venv/bin/python3.11").display().to_string());
        Interpreter {
            name: format!("debian-3.11-uid{UID}"),
            minor: 11,
            free_threaded: false,
            argv,
            fixtures: self.dir.join("fixtures"),
            rootfs: None,
        }
    }
}

impl Drop for PrivateHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_user() -> [&'static str; 4] {
    ["--reuid=1000", "--regid=1000", "--clear-groups", "--"]
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned()
}

fn effective_capabilities(pid: u32) -> u64 {
    u64::from_str_radix(&status_field(pid, "CapEff:"), 16).unwrap()
}

/// The manifest's capabilities as a capability mask.
fn wanted_capabilities() -> u64 {
    deploy::capabilities()
        .iter()
        .map(|c| match c.as_str() {
            "DAC_READ_SEARCH" => 2,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("a capability this test does not know: {other}"),
        })
        .fold(0, |mask, bit| mask | 1 << bit)
}
