//! Hostile tenants: a process on the node that makes its own objects, files
//! or requests into an attack on the agent. Each test mounts one attack and
//! asserts that the agent stays healthy (`/healthz` answers within a second
//! throughout), that an innocent process watched through it keeps exact
//! counts, and that once the agent stops no breakpoint is left in that
//! process.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

use detector::agent::report::TargetStrategy;
use detector_tests::{
    Fixture, NodeAgent, env,
    node_agent::{Bystander, HealthWatch, one_at_a_time, opted_in},
    pyenv,
};

const F: &str = "wl.plain:f";

/// Runs the innocent `plain` workload under `agent`: its exact counts.
fn innocent_counts(agent: &mut NodeAgent) -> usize {
    agent.count_plain(&pyenv(12), &env(&opted_in("innocent")), |_| {})
}

/// A closure whose 24 cells all hold the function itself: a walk that
/// followed every cell at every level would take hours. The walk remembers
/// what it saw and has a budget, so the hostile process's analysis ends at
/// once and the agent answers throughout.
#[test]
fn a_cyclic_closure_costs_only_its_own_analysis() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&["wl.cycle:victim", F], &["--strategy", "watch", "--reachability", "false"]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut hostile = Fixture::start_with_env(&pyenv(12), "cycle", &env(&opted_in("hostile")));
    agent.wait_attached(hostile.pid());
    assert_eq!(innocent_counts(&mut agent), 25);
    hostile.go();
    hostile.wait_done();
    hostile.finish();
    assert_unharmed(agent, health, bystander);
}

/// A process that runs a module body without end, each body a walk of
/// thousands of constants: its walks run off the agent loop and wait for
/// its own share, its queue folds, and another process's import during the
/// storm is walked at once and counted exactly.
#[test]
fn an_endless_importer_waits_for_its_own_walks() {
    let _turn = one_at_a_time();
    const LAZY: &str = "wl.lazy_mod:f";
    let targets = ["wl.reimport_body:never", LAZY, F];
    let mut agent = NodeAgent::start(&targets, &["--strategy", "watch", "--reachability", "false"]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut innocent = Fixture::start_with_env(&pyenv(12), "lazy", &env(&opted_in("innocent")));
    innocent.go();
    agent.wait_attached(innocent.pid());
    let mut hostile = Fixture::start_with_env(&pyenv(12), "reimport", &env(&opted_in("importer")));
    agent.wait_attached(hostile.pid());
    hostile.go();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(innocent.ask("import wl.lazy_mod"), "ok");
    let pid = innocent.pid();
    let armed = agent.events.wait_match("the innocent's import armed", |v| {
        v["type"] == "armed" && v["pid"] == pid && v["targets"].as_array().is_some_and(|t| t.iter().any(|t| t == LAZY))
    });
    // Found as its body ran (or right after), not by the safety net 10 s on.
    assert!(["module body", "module ran"].contains(&armed["source"].as_str().unwrap()), "{armed}");
    assert_eq!(innocent.ask("lazy_mod:use_f 3"), "ok");
    agent.wait_hits(pid, 3);
    let report = agent.process(hostile.pid()).expect("the importer is watched");
    assert!(report.walks_deferred > 0, "the importer never waited for its share: {report:?}");
    assert!(agent.metric("detector_cap_reached_total{cap=\"walk_queue\"}") > 0.0, "its looks never folded");
    hostile.wait_done();
    hostile.finish();
    innocent.finish();
    assert_unharmed(agent, health, bystander);
}

/// A process on 3.10 that makes and calls functions named like a target
/// without end, each a new code object whose resolution is a long walk of
/// its globals: its resolutions run off the agent loop within its own share,
/// and it fills only its own share of the kernel's map of starts awaiting
/// resolution, while another process's start that needs resolving is
/// resolved at once and counted exactly.
#[test]
fn endless_namesakes_wait_for_their_own_resolutions() {
    let _turn = one_at_a_time();
    const UNNAMED: &str = "wl.unnamed:f";
    let args = ["--strategy", "per-call", "--reachability", "false", "--overhead-budget", "0"];
    let mut agent = NodeAgent::start(&[UNNAMED, F], &args);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut hostile = Fixture::start_with_env(&pyenv(10), "namesakes", &env(&opted_in("namesakes")));
    agent.wait_attached(hostile.pid());
    hostile.go();
    std::thread::sleep(Duration::from_secs(2));
    let mut innocent = Fixture::start_with_env(&pyenv(10), "unnamed", &env(&opted_in("innocent")));
    let pid = innocent.pid();
    agent.wait_attached(pid);
    innocent.go();
    innocent.wait_done();
    agent.wait_hits(pid, 5);
    let report = agent.process(hostile.pid()).expect("the namesakes' process is watched");
    assert!(report.walks_deferred > 0, "its resolutions never waited for its share: {report:?}");
    assert!(report.starts_refused > 0, "it never filled its share of the kernel's pending map: {report:?}");
    innocent.finish();
    agent.wait_exited(pid);
    let summary = agent
        .events
        .wait_match("the innocent's summary", |v| v["type"] == "summary" && v["pid"] == pid && v["target"] == UNNAMED);
    assert_eq!(summary["hits"], 5, "{summary}");
    hostile.wait_done();
    hostile.finish();
    assert_unharmed(agent, health, bystander);
}

/// A process that floods the ring buffer while the agent cannot read it
/// (stopped): the kernel drops its events and counts them against it in
/// `/processes`, not against a bystander that sent none meanwhile; its
/// counts stay exact, and the bystander's later events all arrive.
#[test]
fn a_flood_of_events_is_dropped_on_its_own_account() {
    let _turn = one_at_a_time();
    const R: &str = "wl.rounds:f";
    const CALLS: u64 = 100_000;
    let mut agent = NodeAgent::start(&[R, F], &[]);
    let mut bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut flood = Fixture::start_with_env(&pyenv(12), "rounds", &env(&opted_in("flood")));
    flood.go();
    agent.wait_attached(flood.pid());
    // A hit event each (counting exactly): 100,000 of them, and a 1 MiB ring.
    detector_tests::signal(agent.pid(), libc::SIGSTOP);
    flood.call("f", CALLS as u32);
    detector_tests::signal(agent.pid(), libc::SIGCONT);
    let health = agent.watch_health();
    let pid = flood.pid();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let dropped = loop {
        let dropped = agent.process(pid).expect("the flood is watched").events_dropped;
        if dropped > 0 {
            break dropped;
        }
        assert!(std::time::Instant::now() < deadline, "no drop counted against the flood");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(dropped < CALLS, "{dropped} of {CALLS} dropped");
    flood.finish();
    agent.wait_exited(pid);
    let summary = agent.lines("summary", pid).into_iter().find(|s| s["target"] == R).expect("a summary");
    assert_eq!(summary["hits"], CALLS, "counts stay exact: {summary}");
    assert_eq!(bystander.count(&mut agent), 25);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.process(bystander.pid()).expect("watched").events_dropped, 0);
    answered_throughout(health);
    assert_eq!(agent.events.stop_with(libc::SIGTERM).code, Some(0));
    bystander.assert_untouched();
}

/// What every attack must leave: the bystander counted exactly, `/healthz`
/// answered within a second throughout, and, once the agent stops, no
/// breakpoint in the bystander.
fn assert_unharmed(mut agent: NodeAgent, health: HealthWatch, mut bystander: Bystander) {
    assert_eq!(bystander.count(&mut agent), 25);
    answered_throughout(health);
    assert_eq!(agent.events.stop_with(libc::SIGTERM).code, Some(0));
    bystander.assert_untouched();
}

/// 400 half-sent requests from one address (slowloris): that address gets
/// its share of connections, each closed two seconds into its unfinished
/// head, and the rest at once; the kubelet's probes, from another address,
/// are answered throughout.
#[test]
fn half_sent_requests_hold_nothing() {
    let _turn = one_at_a_time();
    let agent = NodeAgent::start(&[F], &[]);
    let health = agent.watch_health();
    // The first answer comes before the flood: what is measured is the
    // agent under it, not a race of two handshakes at its first instant.
    std::thread::sleep(Duration::from_millis(300));
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut held: Vec<TcpStream> = (0..400)
        .map(|_| {
            let mut s = connect_from(attacker, agent.metrics_port());
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: detector\r\n");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let open = held.iter_mut().map(still_open).filter(|open| *open).count();
    assert_eq!(open, 0, "half-sent requests still held after 4 s");
    answered_throughout(health);
}

/// A TCP connection to 127.0.0.1:`port` from the address `from`.
fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    let addr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned, owned from here.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (src, dst) = (addr(from, 0), addr(Ipv4Addr::LOCALHOST, port));
    // SAFETY: valid sockaddr_in values of the length given, on a live socket.
    unsafe {
        assert_eq!(libc::bind(fd, (&raw const src).cast(), len), 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::connect(fd, (&raw const dst).cast(), len), 0, "connect: {}", std::io::Error::last_os_error());
    }
    stream
}

/// Whether the peer has not closed `s` (past whatever it answered, a read
/// would still wait).
fn still_open(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) => return matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// A fork storm in one pod: 24 workers of a watched master. The pod (here a
/// cgroup of its own) gets its quota of watched processes and no more, and
/// a process of another tenant started during the storm is watched with
/// exact counts. When the storm's workers are gone, the quota is free again.
#[test]
fn a_fork_storm_fills_only_its_own_quota() {
    let _turn = one_at_a_time();
    const QUOTA: usize = 4;
    // Room for the storm's quota, the bystander and the innocent process,
    // not for the storm.
    let args = ["--max-processes-per-tenant", &QUOTA.to_string(), "--max-processes", "7"];
    let mut agent = NodeAgent::start(&[F], &args);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let pod = Cgroup::new("storm");
    let mut master = Fixture::start_with_env(&pod.runs(&pyenv(12)), "storm", &env(&opted_in("storm")));
    agent.wait_attached(master.pid());
    master.go();
    let workers = detector_tests::Workers::from_line(&master.read_line());
    let storm: Vec<u32> = workers.0.iter().copied().chain([master.pid()]).collect();
    let watched_of_storm = |agent: &NodeAgent| agent.watched().into_iter().filter(|p| storm.contains(p)).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while watched_of_storm(&agent) < QUOTA {
        assert!(std::time::Instant::now() < deadline, "the storm's pod never reached its quota");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(innocent_counts(&mut agent), 25);
    assert_eq!(watched_of_storm(&agent), QUOTA, "the storm's pod holds exactly its quota");
    let tenant = agent.process(master.pid()).expect("master watched").tenant;
    assert!(tenant.ends_with(&pod.name), "the master's tenant is its cgroup: {tenant}");
    for w in &workers.0 {
        detector_tests::signal(*w, libc::SIGUSR1);
    }
    master.wait_done();
    let pid = master.pid();
    master.finish();
    agent.wait_exited(pid);
    // Its quota is free: a new process of the pod is watched.
    let after = Fixture::start_with_env(&pod.runs(&pyenv(12)), "plain", &env(&opted_in("after")));
    agent.wait_attached(after.pid());
    drop(after);
    assert_unharmed(agent, health, bystander);
}

/// A cgroup of this test's own, below the test's (the memory controller's
/// on a v1 or hybrid node, the unified hierarchy's on a v2 node): the tenant
/// of the processes started in it. Removed when dropped.
struct Cgroup {
    name: String,
    dir: std::path::PathBuf,
}

impl Cgroup {
    fn new(what: &str) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let lines: Vec<&str> = own.lines().collect();
        let (mount, path) = match lines.as_slice() {
            [one] => ("/sys/fs/cgroup", one.splitn(3, ':').nth(2).unwrap()),
            _ => {
                let memory = lines.iter().find(|l| l.split(':').nth(1) == Some("memory")).expect("a memory cgroup");
                ("/sys/fs/cgroup/memory", memory.splitn(3, ':').nth(2).unwrap())
            }
        };
        let name = format!("detector-{what}-{}", std::process::id());
        let dir = std::path::Path::new(mount).join(path.trim_start_matches('/')).join(&name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Cgroup { name, dir }
    }

    /// `interp`, started inside this cgroup (the shell moves itself in, then
    /// executes the interpreter with the same pid).
    fn runs(&self, interp: &detector_tests::Interpreter) -> detector_tests::Interpreter {
        let procs = self.dir.join("cgroup.procs");
        let mut argv =
            vec!["sh".into(), "-c".into(), format!("echo $$ > {} && exec \"$@\"", procs.display()), "sh".into()];
        argv.extend(interp.argv.iter().cloned());
        detector_tests::Interpreter { argv, ..interp.clone() }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes may take a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Stripped interpreters whose debug link names a FIFO, or a symlink to
/// `/dev/zero`, beside them: the analysis opens neither (regular files
/// only, never blocking), finds the layout from the interpreter's own
/// bytes, and counts exactly; the agent answers throughout.
#[test]
fn a_debug_link_to_a_fifo_or_a_device_is_not_followed() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&[F], &[]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    settled_analyses(&agent);
    for (what, plant) in [("fifo", plant_fifo as fn(&std::path::Path)), ("dev-zero", plant_dev_zero)] {
        let dir = std::env::temp_dir().join(format!("detector-debuglink-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A name of its own and no build id: each is a new analysis, which
        // finds only the debug link to look for.
        let link = dir.join(format!("evil-{what}.debug"));
        std::fs::write(&link, b"").unwrap(); // objcopy reads it for the link's CRC
        let python = dir.join("python3.11");
        let made = std::process::Command::new("objcopy")
            .args(["--remove-section=.gnu_debuglink", "--remove-section=.note.gnu.build-id"])
            .arg(format!("--add-gnu-debuglink={}", link.display()))
            .args(["/usr/bin/python3.11".as_ref(), python.as_os_str()])
            .status()
            .unwrap();
        assert!(made.success(), "objcopy");
        std::fs::remove_file(&link).unwrap();
        plant(&link);
        let interp = detector_tests::Interpreter {
            name: format!("debian-3.11-debuglink-{what}"),
            minor: 11,
            free_threaded: false,
            argv: vec![python.display().to_string()],
            fixtures: detector_tests::fixtures_dir(),
            rootfs: None,
        };
        let analysed = agent.metric("detector_analysis_cache_misses_total");
        assert_eq!(agent.count_plain(&interp, &env(&opted_in(what)), |_| {}), 25, "{what}");
        agent.wait_metric("detector_analysis_cache_misses_total", analysed + 1.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(peak_rss_kib(agent.pid()) < 200 * 1024, "the agent's peak RSS is {} KiB", peak_rss_kib(agent.pid()));
    assert_unharmed(agent, health, bystander);
}

/// A lookalike interpreter: Debian's python3.11 with one byte of its
/// read-only data changed and its build id kept. The analysis cache keys on
/// content, so the lookalike is analysed anew rather than given the genuine
/// file's analysis (or refusal); both count exactly, and a copy with the
/// genuine content is not analysed again.
#[test]
fn a_lookalike_with_a_genuine_build_id_is_analysed_anew() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&[F], &[]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let before = settled_analyses(&agent);
    let dir = std::env::temp_dir().join(format!("detector-lookalike-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("copy")).unwrap();
    let genuine = std::fs::read("/usr/bin/python3.11").unwrap();
    let banner: &[u8] = b"Type \"help\", \"copyright\"";
    let at = genuine.windows(banner.len()).position(|w| w == banner).expect("the interactive banner");
    let mut lookalike = genuine.clone();
    lookalike[at + 6..at + 10].copy_from_slice(b"HELP");
    let write = |path: &std::path::Path, bytes: &[u8]| {
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    write(&dir.join("python3.11"), &lookalike);
    write(&dir.join("copy/python3.11"), &genuine);
    let interp = |path: std::path::PathBuf, name: &str| detector_tests::Interpreter {
        name: name.into(),
        minor: 11,
        free_threaded: false,
        argv: vec![path.display().to_string()],
        fixtures: detector_tests::fixtures_dir(),
        rootfs: None,
    };
    let runs = [
        ("/usr/bin/python3.11".into(), "genuine", 1.0),
        (dir.join("python3.11"), "lookalike", 2.0),
        (dir.join("copy/python3.11"), "copy", 2.0),
    ];
    for (path, name, analyses) in runs {
        assert_eq!(agent.count_plain(&interp(path, name), &env(&opted_in(name)), |_| {}), 25, "{name}");
        agent.wait_metric("detector_analysis_cache_misses_total", before + analyses);
    }
    assert_eq!(settled_analyses(&agent), before + 2.0, "the genuine copy was analysed again");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_unharmed(agent, health, bystander);
}

/// The analyses made so far, once the metric has stopped moving for a
/// second (it is published a moment after each).
fn settled_analyses(agent: &NodeAgent) -> f64 {
    let mut last = agent.metric("detector_analysis_cache_misses_total");
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = agent.metric("detector_analysis_cache_misses_total");
        if now == last {
            return now;
        }
        last = now;
    }
}

fn plant_fifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo");
}

fn plant_dev_zero(path: &std::path::Path) {
    std::os::unix::fs::symlink("/dev/zero", path).unwrap();
}

/// A process with 60,000 mappings of a file (a 6 MB `/proc/PID/maps`): the
/// agent reads it streaming and capped, stays under 200 MiB, answers
/// throughout, and counts an innocent process exactly.
#[test]
fn sixty_thousand_mappings_cost_only_their_own_analysis() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&[F], &[]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut hostile = Fixture::start_with_env(&pyenv(12), "mappings", &env(&opted_in("mappings")));
    let lines = std::fs::read_to_string(format!("/proc/{}/maps", hostile.pid())).unwrap().lines().count();
    assert!(lines > 60_000, "the fixture made its mappings: {lines}");
    assert_eq!(innocent_counts(&mut agent), 25);
    hostile.go();
    hostile.wait_done();
    hostile.finish();
    let peak_kib = peak_rss_kib(agent.pid());
    assert!(peak_kib < 200 * 1024, "the agent's peak RSS is {peak_kib} KiB");
    assert_unharmed(agent, health, bystander);
}

/// A payload of 65,536 targets: refused whole as that file's error (a
/// config holds at most 4,096), counted before anything is deduplicated or
/// sent to the kernel; the target given on the command line keeps working,
/// the agent answers throughout, and an innocent process is counted exactly.
#[test]
fn sixty_four_thousand_targets_are_refused_not_stalled() {
    let _turn = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("detector-64k-targets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("targets.json");
    let targets: Vec<String> = (0..65_536).map(|n| format!("zz.flood{n}:f{n}")).collect();
    std::fs::write(&file, serde_json::json!({ "targets": targets }).to_string()).unwrap();
    let mut agent = NodeAgent::start(&[F], &["--targets", &file.display().to_string()]);
    let health = agent.watch_health();
    agent.wait_metric("detector_targets", 1.0);
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    assert_unharmed(agent, health, bystander);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The agent at its descriptor limit: 300 connections from 60 addresses
/// (each within its per-peer share) take every descriptor it has. Accepting
/// then fails and backs off instead of spinning a core, and once the flood
/// is gone `/healthz` answers again.
#[test]
fn running_out_of_descriptors_neither_spins_nor_sticks() {
    let _turn = one_at_a_time();
    let limit = ["prlimit", "--nofile=256:256", "--"].map(String::from);
    let agent = NodeAgent::start_wrapped(&limit, &[F], &[]);
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = cpu_ticks(agent.pid());
    let flood: Vec<TcpStream> =
        (0..300).map(|n| connect_from(Ipv4Addr::new(127, 0, 1, 1 + (n % 60) as u8), agent.metrics_port())).collect();
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(agent.pid()) - cpu_before;
    // 100 ticks a second: a spinning accept loop would use about 300.
    assert!(ticks < 100, "the agent used {ticks} ticks of CPU in 3 s at its descriptor limit");
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.try_get("/healthz").is_none() {
        assert!(std::time::Instant::now() < deadline, "/healthz never answered again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// User and system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let field = |n: usize| rest.split_whitespace().nth(n).unwrap().parse::<u64>().unwrap();
    field(11) + field(12)
}

/// Huge containers: the target's module has a million and a half globals,
/// its class 200,000 methods. The walk stays within its caps and budget and
/// finds the target; the agent stays under 200 MiB and answers throughout,
/// and an innocent process is counted exactly.
#[test]
fn huge_containers_cost_only_their_own_analysis() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&["wl.huge:Box.victim", F], &["--strategy", "watch"]);
    let health = agent.watch_health();
    let bystander = Bystander::start(&mut agent, &pyenv(12));
    let mut hostile = Fixture::start_with_env(&pyenv(12), "huge", &env(&opted_in("huge")));
    agent.wait_attached(hostile.pid());
    assert_eq!(innocent_counts(&mut agent), 25);
    hostile.go();
    hostile.wait_done();
    // Its own target is found too, past a million and a half globals, and
    // watched, not left to a fallback.
    agent.wait_hits(hostile.pid(), 5);
    let report = agent.process(hostile.pid()).expect("watched");
    assert_eq!(report.targets_by_strategy.get(&TargetStrategy::Watch), Some(&1), "{report:?}");
    hostile.finish();
    assert!(peak_rss_kib(agent.pid()) < 200 * 1024, "the agent's peak RSS is {} KiB", peak_rss_kib(agent.pid()));
    assert_unharmed(agent, health, bystander);
}

/// The peak resident memory of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    peak.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Stops `health`, asserting that every `/healthz` was answered within a second.
fn answered_throughout(health: HealthWatch) {
    let worst = health.stop().expect("the agent answered throughout");
    assert!(worst.as_secs_f64() < 1.0, "slowest /healthz {worst:?}");
}
