//! Starting a command so that it is watched from its first Python call.
//!
//! The child runs under ptrace only until the entry point of each program it
//! executes: there every `DT_NEEDED` library (libpython included) is mapped
//! but no Python has run. If the program is a Python interpreter the caller
//! attaches and the child is released; otherwise (a `pyenv` shim, `env`) it
//! runs on to its next `exec`. The child is never modified after release.

use std::{
    io,
    os::unix::process::CommandExt,
    process::{Command, ExitStatus},
    sync::mpsc,
    thread::JoinHandle,
};

use crate::{
    interp::cache::AnalysisCache,
    pyproc::{ProcessError, PythonProcess},
};

/// Why a command could not be started and watched.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `exec` failed.
    #[error("cannot run {command}")]
    Start {
        /// The program.
        command: String,
        /// Cause.
        source: io::Error,
    },
    /// A ptrace request failed.
    #[error("tracing the command failed")]
    Trace(#[source] io::Error),
    /// The command exited before it ran Python.
    #[error("{command} exited ({status}) without running a Python interpreter")]
    NeverPython {
        /// The program.
        command: String,
        /// How it ended.
        status: String,
    },
    /// It ran a Python that cannot be watched.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// A started command, stopped at the entry of its Python interpreter.
pub struct Spawned {
    /// The interpreter process (same pid as the command).
    pub process: PythonProcess,
    release: mpsc::Sender<bool>,
    tracer: JoinHandle<io::Result<ExitStatus>>,
}

impl Spawned {
    /// Lets the child run, detached from ptrace. Returns a handle that yields
    /// its exit status. Dropping a `Spawned` instead kills the child, which
    /// was never watched.
    pub fn release(self) -> JoinHandle<io::Result<ExitStatus>> {
        let _ = self.release.send(true);
        self.tracer
    }
}

/// Starts `argv` and returns once it is stopped at the entry of a Python
/// interpreter (analysed through `cache`), following execs of anything else.
pub fn spawn_python(argv: &[String], cache: std::sync::Arc<AnalysisCache>) -> Result<Spawned, SpawnError> {
    spawn(argv, move |pid| match crate::pyproc::locate(pid, &cache) {
        Ok(p) => Ok(Some(p)),
        Err(ProcessError::NotPython { .. }) => Ok(None),
        Err(e) => Err(e),
    })
}

/// How a released command ended, once it has: `None` if that is unknown.
pub async fn exit_status(released: JoinHandle<io::Result<ExitStatus>>) -> Option<String> {
    let joined = tokio::task::spawn_blocking(move || released.join()).await.ok()?;
    Some(joined.ok()?.ok()?.to_string())
}

enum Stop {
    /// Stopped at the entry point of the current image (or, from
    /// `run_to_exec`, right after an exec).
    Entry,
    /// Exited or killed, with its wait status.
    Gone(i32),
}

/// Starts `argv` and returns once it is stopped at the entry of a program
/// that `locate` recognises as Python. `locate` returns `Ok(None)` for "not
/// Python, keep following execs".
pub fn spawn<F>(argv: &[String], locate: F) -> Result<Spawned, SpawnError>
where
    F: Fn(u32) -> Result<Option<PythonProcess>, ProcessError> + Send + 'static,
{
    let argv = argv.to_vec();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<PythonProcess, SpawnError>>();
    let (release_tx, release_rx) = mpsc::channel::<bool>();
    // ptrace requests must come from the thread that is the tracer, which
    // for PTRACE_TRACEME is the thread that forked: all of it happens here.
    let tracer = std::thread::Builder::new()
        .name("detector-spawn".into())
        .spawn(move || -> io::Result<ExitStatus> {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            // SAFETY: the closure calls only ptrace, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(source) => {
                    let _ = ready_tx.send(Err(SpawnError::Start { command: argv[0].clone(), source }));
                    return Err(io::Error::other("spawn failed"));
                }
            };
            let pid = child.id() as i32;
            let outcome = trace_to_python(pid, &argv[0], &locate);
            match outcome {
                Ok(p) => {
                    let _ = ready_tx.send(Ok(p));
                    // Wait for the caller to attach, then let go; if it gave
                    // up, the child must not run unwatched.
                    if release_rx.recv() != Ok(true) {
                        // SAFETY: plain integer arguments; `pid` is our own child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    // SAFETY: plain integer arguments; `pid` is our traced child.
                    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
                }
                Err((e, gone)) => {
                    let _ = ready_tx.send(Err(e));
                    if !gone {
                        // SAFETY: plain integer arguments; `pid` is our own child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            child.wait()
        })
        .map_err(SpawnError::Trace)?;
    match ready_rx.recv() {
        Ok(Ok(process)) => Ok(Spawned { process, release: release_tx, tracer }),
        Ok(Err(e)) => {
            let _ = tracer.join();
            Err(e)
        }
        Err(_) => Err(SpawnError::Trace(io::Error::other("tracer thread ended"))),
    }
}

/// Follows the child from exec to exec until one is Python. The error's flag
/// says whether the child is already gone.
fn trace_to_python<F>(pid: i32, command: &str, locate: &F) -> Result<PythonProcess, (SpawnError, bool)>
where
    F: Fn(u32) -> Result<Option<PythonProcess>, ProcessError>,
{
    let trace = |e: io::Error| (SpawnError::Trace(e), false);
    // The first stop is the SIGTRAP of the initial exec.
    let status = wait(pid).map_err(trace)?;
    if !libc::WIFSTOPPED(status) {
        return Err((never_python(command, status), true));
    }
    let opts = libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL;
    ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts as u64).map_err(trace)?;
    loop {
        if let Stop::Gone(status) = run_to_entry(pid).map_err(trace)? {
            return Err((never_python(command, status), true));
        }
        match locate(pid as u32) {
            Ok(Some(p)) => return Ok(p),
            // A wrapper (shim, `env`, `chroot`): follow it to its next exec.
            Ok(None) => {
                if let Stop::Gone(status) = run_to_exec(pid).map_err(trace)? {
                    return Err((never_python(command, status), true));
                }
            }
            Err(e) => return Err((e.into(), false)),
        }
    }
}

/// Lets the stopped child run until it executes a new image (stopped right
/// after the exec) or ends.
fn run_to_exec(pid: i32) -> io::Result<Stop> {
    ptrace(libc::PTRACE_CONT, pid, 0, 0)?;
    loop {
        match next_event(pid)? {
            Event::Gone(status) => return Ok(Stop::Gone(status)),
            Event::Exec => return Ok(Stop::Entry),
            Event::Trap => ptrace(libc::PTRACE_CONT, pid, 0, 0)?,
            Event::Signal(sig) => ptrace(libc::PTRACE_CONT, pid, 0, sig as u64)?,
        };
    }
}

/// What stopped (or ended) the traced child.
enum Event {
    /// Exited or killed, with its wait status.
    Gone(i32),
    /// Executed a new image.
    Exec,
    /// A plain SIGTRAP (our breakpoint, or the child's own).
    Trap,
    /// Any other signal, to be delivered to the child.
    Signal(i32),
}

fn next_event(pid: i32) -> io::Result<Event> {
    let status = wait(pid)?;
    if !libc::WIFSTOPPED(status) {
        return Ok(Event::Gone(status));
    }
    let sig = libc::WSTOPSIG(status);
    Ok(match (sig, (status >> 16) & 0xff) {
        (libc::SIGTRAP, libc::PTRACE_EVENT_EXEC) => Event::Exec,
        (libc::SIGTRAP, _) => Event::Trap,
        (sig, _) => Event::Signal(sig),
    })
}

fn never_python(command: &str, status: i32) -> SpawnError {
    let status = if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    };
    SpawnError::NeverPython { command: command.trim().to_owned(), status }
}

/// Runs the stopped child to the entry point of its current image, via a
/// one-byte breakpoint that is removed again before returning.
fn run_to_entry(pid: i32) -> io::Result<Stop> {
    let entry = auxv_entry(pid)?;
    let word = peek(pid, entry)?;
    ptrace(libc::PTRACE_POKETEXT, pid, entry, (word & !0xff) | 0xcc)?;
    ptrace(libc::PTRACE_CONT, pid, 0, 0)?;
    loop {
        match next_event(pid)? {
            Event::Gone(status) => return Ok(Stop::Gone(status)),
            // A new image replaced the old one, breakpoint and all.
            Event::Exec => return run_to_entry(pid),
            Event::Trap => {
                // SAFETY: a struct of integers, valid when zeroed.
                let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs as *mut _ as u64)?;
                if regs.rip == entry + 1 {
                    ptrace(libc::PTRACE_POKETEXT, pid, entry, word)?;
                    regs.rip = entry;
                    ptrace(libc::PTRACE_SETREGS, pid, 0, &regs as *const _ as u64)?;
                    return Ok(Stop::Entry);
                }
                ptrace(libc::PTRACE_CONT, pid, 0, 0)?;
            }
            // Signals belong to the child: deliver them.
            Event::Signal(sig) => {
                ptrace(libc::PTRACE_CONT, pid, 0, sig as u64)?;
            }
        }
    }
}

fn auxv_entry(pid: i32) -> io::Result<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))?;
    auxv.chunks_exact(16)
        .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
        .find(|(k, _)| *k == libc::AT_ENTRY)
        .map(|(_, v)| v)
        .ok_or_else(|| io::Error::other("no AT_ENTRY in auxv"))
}

fn ptrace(req: libc::c_uint, pid: i32, addr: u64, data: u64) -> io::Result<i64> {
    // SAFETY: callers pass requests whose `data` is an integer or points at a live buffer of the size the request writes.
    let r = unsafe { libc::ptrace(req, pid, addr as *mut libc::c_void, data as *mut libc::c_void) };
    if r == -1 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn peek(pid: i32, addr: u64) -> io::Result<u64> {
    // PEEKTEXT returns the word itself, so -1 is ambiguous: check errno.
    // SAFETY: errno is this thread's own.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: PEEKTEXT reads the tracee and writes nothing of ours.
    let r = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, pid, addr as *mut libc::c_void, 0) };
    let err = io::Error::last_os_error();
    if r == -1 && err.raw_os_error() != Some(0) { Err(err) } else { Ok(r as u64) }
}

fn wait(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int to write.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
