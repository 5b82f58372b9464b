//! The agent confines itself once its programs are loaded and before it
//! reads the processes it discovers. This guards against a misdirected
//! write (a bug, or a hostile process's bytes steering a path): the kernel
//! refuses the agent the means to change a watched process or the node's
//! files. It does not contain an agent whose code is taken over: that one
//! still holds `bpf()` and its maps. A seccomp filter on every thread
//! refuses with EPERM:
//!
//! - opening a file for writing, creating or truncating one (`open`,
//!   `openat`, `creat`), so `/proc/PID/mem` cannot be opened for writing;
//!   `openat2`'s flags are out of a filter's reach, and its one caller
//!   (`interp::file`) passes `O_RDONLY` only;
//! - making, linking, renaming or changing files (`mknod`, `link`,
//!   `symlink`, `rename`, `truncate`, `chmod`, `fchmod`, `chown`, `mkdir`,
//!   extended attributes, times); removing is allowed, for the tap's socket;
//! - `process_vm_writev`, `ptrace`, `pidfd_getfd`, `execve`, io_uring
//!   (whose operations no filter sees), unix sockets (a container runtime's
//!   socket is one), new namespaces (`unshare`, `setns`, `clone` flags);
//! - file handles (`open_by_handle_at` reaches outside any mount namespace
//!   with `CAP_DAC_READ_SEARCH`), mounts, modules, kexec and reboot.
//!
//! `clone3`, whose flags are out of reach too, returns ENOSYS, so the C
//! library starts threads with `clone`. x32 system calls are not filtered.
//! Loading BPF programs stays allowed: aya checks a helper's support by
//! loading a probe program at every attach with a cookie.
//! Landlock would say "no writes" more simply, but a Landlock domain fails
//! the ptrace check on every process outside it, which is every process the
//! agent reads. Only `run` without a command is confined: a command it
//! starts would inherit the filter, and starting it uses ptrace.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Why the agent could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The seccomp filter could not be built or installed.
    #[error("installing the seccomp filter")]
    Seccomp(#[from] seccompiler::Error),
    /// seccomp does not know this machine's architecture.
    #[error("no seccomp filter for this architecture")]
    Arch,
}

/// Confines every thread of this process, and those it starts later.
pub fn confine() -> Result<(), ConfineError> {
    let arch: TargetArch = std::env::consts::ARCH.try_into().map_err(|_| ConfineError::Arch)?;
    let backend = seccompiler::Error::Backend;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(libc::SYS_open, opens_for_writing(1).map_err(backend)?);
    rules.insert(libc::SYS_openat, opens_for_writing(2).map_err(backend)?);
    let arg0 = |op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, op, value).and_then(|c| SeccompRule::new(vec![c]))
    };
    rules.insert(libc::SYS_socket, vec![arg0(SeccompCmpOp::Eq, libc::AF_UNIX as u64).map_err(backend)?]);
    rules.insert(
        libc::SYS_clone,
        NAMESPACES
            .iter()
            .map(|&flag| {
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag as u64), flag as u64)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<_, _>>()
            .map_err(backend)?,
    );
    install(rules, libc::EPERM, arch)?;
    // Threads are started with clone, which the C library falls back to.
    install([(libc::SYS_clone3, Vec::new())].into(), libc::ENOSYS, arch)?;
    Ok(())
}

/// Installs a filter refusing the calls `rules` match with `errno`.
fn install(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32, arch: TargetArch) -> Result<(), ConfineError> {
    let backend = seccompiler::Error::Backend;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch).map_err(backend)?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(backend)?;
    seccompiler::apply_filter_all_threads(&program)?;
    Ok(())
}

/// Rules matching an open whose flags (argument `arg`) write, create or
/// truncate.
fn opens_for_writing(arg: u8) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let flags = |mask: libc::c_int, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask as u64), value as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    Ok(vec![
        flags(libc::O_ACCMODE, libc::O_WRONLY)?,
        flags(libc::O_ACCMODE, libc::O_RDWR)?,
        flags(libc::O_ACCMODE, libc::O_ACCMODE)?,
        flags(libc::O_CREAT, libc::O_CREAT)?,
        flags(libc::O_TRUNC, libc::O_TRUNC)?,
    ])
}

/// `clone` flags that make a namespace: any one is refused.
const NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// Calls the agent never makes, refused with EPERM on every thread.
const DENIED: &[libc::c_long] = &[
    libc::SYS_creat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_truncate,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_utimensat,
    libc::SYS_futimesat,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
    libc::SYS_pidfd_getfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_userfaultfd,
];

#[cfg(test)]
mod tests {
    use std::{io, path::PathBuf, process::Command};

    use super::*;

    const CHILD_DIR: &str = "DETECTOR_CONFINE_TEST_DIR";

    fn refused(r: io::Result<impl Sized>) -> bool {
        matches!(r.map(|_| ()).map_err(|e| e.raw_os_error()), Err(Some(libc::EACCES | libc::EPERM)))
    }

    /// The checks, in the test's own child process (confinement cannot be
    /// undone): the test below runs itself again with [`CHILD_DIR`] set.
    fn confined_child(dir: PathBuf) {
        std::fs::write(dir.join("existing"), b"x").unwrap();
        confine().unwrap();
        assert!(refused(std::fs::write(dir.join("new"), b"x")), "creating a file");
        assert!(refused(std::fs::OpenOptions::new().append(true).open(dir.join("existing"))), "appending");
        assert!(refused(std::fs::create_dir(dir.join("d"))), "making a directory");
        assert_eq!(std::fs::read(dir.join("existing")).unwrap(), b"x", "reading stays allowed");
        assert!(refused(std::fs::OpenOptions::new().write(true).open("/proc/self/mem")), "/proc/PID/mem for writing");
        assert!(std::fs::File::open("/proc/self/maps").is_ok(), "reading stays allowed");
        let byte = [0u8; 1];
        let local = libc::iovec { iov_base: byte.as_ptr() as *mut _, iov_len: 1 };
        let remote = libc::iovec { iov_base: byte.as_ptr() as *mut _, iov_len: 1 };
        // SAFETY: one-byte iovecs over a live local buffer, in this process.
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        assert!(n == -1 && refused(Err::<(), _>(io::Error::last_os_error())), "process_vm_writev");
        let file = std::fs::File::open(dir.join("existing")).unwrap();
        assert!(refused(file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o777))), "fchmod");
        assert!(std::thread::spawn(|| 7).join().unwrap() == 7, "threads still start (clone3 falls back to clone)");
        // SAFETY: plain integer arguments.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd == -1 && refused(Err::<(), _>(io::Error::last_os_error())), "unix socket");
        assert!(std::net::UdpSocket::bind("127.0.0.1:0").is_ok(), "inet sockets stay allowed");
        // SAFETY: PTRACE_TRACEME takes no pointers.
        let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        assert!(r == -1 && refused(Err::<(), _>(io::Error::last_os_error())), "ptrace");
    }

    #[test]
    fn confinement_refuses_writes_and_process_changes() {
        if let Some(dir) = std::env::var_os(CHILD_DIR) {
            return confined_child(dir.into());
        }
        let dir = std::env::temp_dir().join(format!("detector-confine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "confine::tests::confinement_refuses_writes_and_process_changes", "--test-threads=1"])
            .env(CHILD_DIR, &dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
