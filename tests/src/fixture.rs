//! A workload process (tests/fixtures/run.py) and its stdin/stdout handshake.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, channel},
};

use crate::{Interpreter, STEP_TIMEOUT};

/// A running workload.
pub struct Fixture {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Fixture {
    /// Starts `workload` on `interp` and waits until it is set up.
    pub fn start(interp: &Interpreter, workload: &str) -> Self {
        Self::start_with_env(interp, workload, &[])
    }

    /// As [`Fixture::start`], with extra environment variables.
    pub fn start_with_env(interp: &Interpreter, workload: &str, env: &[(&str, &str)]) -> Self {
        let script = interp.fixtures.join("run.py");
        let mut child = Command::new(&interp.argv[0])
            .args(&interp.argv[1..])
            .arg(&script)
            .arg(workload)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", interp.name));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut f = Fixture { name: format!("{} {workload}", interp.name), stdin: child.stdin.take(), child, lines };
        f.expect("ready");
        f
    }

    /// The workload's pid (the interpreter's, also under chroot, which execs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Restricts the workload (and threads it starts later) to `cpu`.
    pub fn pin(&self, cpu: usize) {
        pin(self.pid(), cpu);
    }

    /// The next line the workload prints.
    pub fn read_line(&mut self) -> String {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => line,
            Err(_) => panic!("{}: no output (exit: {:?})", self.name, self.child.try_wait()),
        }
    }

    fn expect(&mut self, want: &str) {
        let line = self.read_line();
        assert_eq!(line, want, "{}", self.name);
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|_| stdin.flush()).unwrap();
    }

    /// Sends `line` and returns the workload's reply.
    pub fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.read_line()
    }

    /// Lets the workload run.
    pub fn go(&mut self) {
        self.send("go");
    }

    /// `rounds` workload: calls `name` `n` times.
    pub fn call(&mut self, name: &str, n: u32) {
        self.send(&format!("{name} {n}"));
        self.expect("ok");
    }

    /// Waits until the workload has run.
    pub fn wait_done(&mut self) {
        self.expect("done");
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(mut self) -> Option<i32> {
        drop(self.stdin.take());
        self.child.wait().unwrap().code()
    }

    /// Lets the workload exit and reaps it.
    pub fn finish(mut self) {
        if self.stdin.is_some() {
            self.send("exit");
        }
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}: exited with {status}", self.name);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Never leave a workload behind when a test fails.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Restricts process `pid` (0: this one) to `cpu`.
pub fn pin(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty and valid; it outlives the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(pid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity({pid}, {cpu}): {}", std::io::Error::last_os_error());
    }
}
