//! Reading a file a watched process names (its interpreter's separate debug
//! files) as that process sees it, and no further: resolved inside its root
//! directory (symlinks, `..` and absolute names included stay inside it),
//! never through a magic link, opened without blocking (a FIFO cannot hang
//! the analysis), regular files only, and never more than a cap.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// The largest interpreter image or debug file read (the largest seen,
/// Debian's `libpython3.14d.so`, is 39 MB).
pub(crate) const MAX_FILE: u64 = 64 << 20;

/// The kernel's `struct open_how` (libc's cannot be built field by field).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `path` inside `root` (a directory such as `/proc/PID/root`), read whole
/// if it is a regular file of at most [`MAX_FILE`] bytes.
pub(crate) fn read_in_root(root: &Path, path: &Path) -> io::Result<Vec<u8>> {
    read_capped(open_in_root(root, path)?)
}

/// `path` opened read-only inside `root`, as a process whose root it is
/// would open it: symlinks, `..` and absolute names resolve there, never
/// in the agent's root, and never through a magic link.
pub(crate) fn open_in_root(root: &Path, path: &Path) -> io::Result<File> {
    openat2_in_root(root, path, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
}

/// What `path` inside `root` is, resolved as [`open_in_root`] does, without
/// opening it for reading (opening a device can act on it).
pub(crate) fn stat_in_root(root: &Path, path: &Path) -> io::Result<std::fs::Metadata> {
    openat2_in_root(root, path, libc::O_PATH | libc::O_CLOEXEC)?.metadata()
}

/// The first `max` names in directory `path` inside `root` (resolved as
/// [`open_in_root`] does), and whether more were left.
pub(crate) fn list_in_root(root: &Path, path: &Path, max: usize) -> io::Result<(Vec<std::ffi::OsString>, bool)> {
    let dir = openat2_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)?;
    // Our own descriptor, already resolved inside the root.
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir)))?;
    let mut names = Vec::new();
    for entry in entries {
        if names.len() == max {
            return Ok((names, true));
        }
        names.push(entry?.file_name());
    }
    Ok((names, false))
}

/// Regular file `path` inside `root`, opened only once it is known to be
/// one (opening a device can act on it).
pub(crate) fn open_file_in_root(root: &Path, path: &Path) -> io::Result<File> {
    if !stat_in_root(root, path)?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let file = open_in_root(root, path)?;
    // It may have been swapped in between: the open descriptor decides.
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// The first `max` bytes of regular file `path` inside `root`.
pub(crate) fn read_head_in_root(root: &Path, path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_file_in_root(root, path)?;
    let mut data = Vec::new();
    file.take(max).read_to_end(&mut data)?;
    Ok(data)
}

fn openat2_in_root(root: &Path, path: &Path, flags: i32) -> io::Result<File> {
    let root = open_dir(root)?;
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let how = OpenHow { flags: flags as u64, mode: 0, resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS };
    // SAFETY: a live directory descriptor, a NUL-terminated name and an
    // `open_how` of the size given, all outliving the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            name.as_ptr(),
            &raw const how,
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned from here.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// `file` read whole, if it is a regular file of at most [`MAX_FILE`] bytes.
pub(crate) fn read_capped(file: File) -> io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {MAX_FILE} bytes")));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // The size may change under us: the cap holds whatever it becomes.
    file.take(MAX_FILE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_FILE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {MAX_FILE} bytes")));
    }
    Ok(data)
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(dir.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated name that outlives the call.
    let fd = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned from here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_inside_the_root_and_reads_regular_files_only() {
        let root = std::env::temp_dir().join(format!("detector-file-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("lib")).unwrap();
        std::fs::write(root.join("lib/inside.debug"), b"inside").unwrap();
        std::fs::write(root.join("outside-target"), b"outside").unwrap();
        // Absolute and `..` links resolve against the root, not ours.
        std::os::unix::fs::symlink("/lib/inside.debug", root.join("lib/absolute")).unwrap();
        std::os::unix::fs::symlink("../../../../../../lib/inside.debug", root.join("lib/dots")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("lib/escape")).unwrap();
        let fifo = CString::new(root.join("lib/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated name.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        assert_eq!(read_in_root(&root, Path::new("/lib/inside.debug")).unwrap(), b"inside");
        assert_eq!(read_in_root(&root, Path::new("lib/absolute")).unwrap(), b"inside");
        assert_eq!(read_in_root(&root, Path::new("lib/dots")).unwrap(), b"inside");
        assert!(read_in_root(&root, Path::new("lib/escape")).is_err(), "no /etc/hostname inside");
        // Opened without blocking, then refused: no writer is waited for.
        assert!(read_in_root(&root, Path::new("lib/fifo")).is_err());
        assert!(read_in_root(&root, Path::new("/proc/self/exe")).is_err());
        assert!(read_capped(File::open("/dev/zero").unwrap()).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
