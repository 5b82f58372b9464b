//! `/proc/PID/maps`, and finding the object that holds a process's interpreter.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::ProcessError;
use crate::interp::file;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions, e.g. `r-xp`.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Device, `major:minor` in hex as the kernel prints it.
    pub dev: String,
    /// Inode (0 for anonymous mappings).
    pub inode: u64,
    /// Path, as seen in the process's mount namespace.
    pub path: Option<String>,
}

impl Mapping {
    /// Whether this maps a file (not anonymous, not `[heap]` and the like).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }
}

/// Parses one line of `/proc/PID/maps`.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, offset, dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let path = it.next().map(str::trim_start).filter(|p| !p.is_empty()).map(str::to_owned);
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms: perms.to_owned(),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_owned(),
        inode: inode.parse().ok()?,
        path,
    })
}

/// Most lines of `/proc/PID/maps` read: a process may map as much as it
/// likes (65k mappings took an agent that read them whole to 500 MB).
const MAX_LINES: usize = 1 << 20;
/// Most file mappings kept (an interpreter's are a handful).
const MAX_FILE_MAPPINGS: usize = 8192;

/// The file-backed mappings of `pid`, read a line at a time.
pub fn read(pid: u32) -> Result<Vec<Mapping>, ProcessError> {
    let file = std::fs::File::open(format!("/proc/{pid}/maps")).map_err(|e| ProcessError::io(pid, e))?;
    let mut out = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(file)).take(MAX_LINES) {
        let line = line.map_err(|e| ProcessError::io(pid, e))?;
        if let Some(m) = parse_line(&line).filter(Mapping::is_file) {
            if out.len() == MAX_FILE_MAPPINGS {
                return Err(ProcessError::NotPython {
                    pid,
                    reason: format!("more than {MAX_FILE_MAPPINGS} file mappings"),
                });
            }
            out.push(m);
        }
    }
    Ok(out)
}

/// Whether any line of `/proc/PID/maps` satisfies `pred`, read a line at a
/// time and at most [`MAX_LINES`].
pub fn any_line(pid: u32, pred: impl Fn(&str) -> bool) -> bool {
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/maps")) else { return false };
    std::io::BufRead::lines(std::io::BufReader::new(file)).take(MAX_LINES).map_while(Result::ok).any(|l| pred(&l))
}

/// A file mapped into a process.
#[derive(Clone, Debug)]
pub struct MappedFile {
    /// Path in the process's mount namespace.
    pub path: String,
    /// A path this process can open that names the same inode: through
    /// `/proc/PID/root` (so container files work), else `/proc/PID/map_files`.
    pub open_path: PathBuf,
    /// Lowest address it is mapped at, with file offset 0.
    pub base: u64,
    /// The inode the process maps.
    pub inode: u64,
    /// The process's root directory (`/proc/PID/root`), where files it names
    /// (separate debug files) are looked up.
    pub root: PathBuf,
}

impl MappedFile {
    /// Opens the file, never blocking, and checks that it is a regular file
    /// and the inode the process maps: this one descriptor is then read for
    /// the analysis and named for every uprobe (`/proc/self/fd/N`), so the
    /// file cannot be swapped between the check, the analysis and the attach.
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = if self.open_path.starts_with(&self.root) {
            // Symlinks the process's files hold resolve inside its root.
            file::open_in_root(&self.root, Path::new(&self.path))?
        } else {
            std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(&self.open_path)?
        };
        let md = file.metadata()?;
        if !md.is_file() || md.ino() != self.inode {
            return Err(std::io::Error::other(format!(
                "{} is not the file the process maps (inode {}, found {})",
                self.open_path.display(),
                self.inode,
                md.ino()
            )));
        }
        Ok(file)
    }
}

/// Mapped files whose name suggests a Python interpreter, most specific
/// first: `libpython*` libraries, then the executable.
pub fn interpreter_candidates(pid: u32, maps: &[Mapping]) -> Vec<MappedFile> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_owned());
    let mut out: Vec<MappedFile> = Vec::new();
    let mut push = |path: &str| {
        if out.iter().any(|m| m.path == path) {
            return;
        }
        if let Some(m) = mapped_file(pid, maps, path) {
            out.push(m);
        }
    };
    for m in maps.iter().filter(|m| m.is_file()) {
        let path = m.path.as_deref().unwrap();
        let base = path.rsplit('/').next().unwrap_or(path);
        if base.starts_with("libpython") {
            push(path);
        }
    }
    if let Some(exe) = exe {
        push(&exe);
    }
    out
}

/// Locates `path` in the process's mappings and finds a way to open it.
pub fn mapped_file(pid: u32, maps: &[Mapping], path: &str) -> Option<MappedFile> {
    let mine: Vec<&Mapping> = maps.iter().filter(|m| m.path.as_deref() == Some(path)).collect();
    let first = mine.iter().find(|m| m.offset == 0).or(mine.first())?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let open_path = match file::stat_in_root(&root, Path::new(path)) {
        Ok(md) if md.ino() == first.inode => root.join(path.trim_start_matches('/')),
        // Replaced on disk, or another namespace we cannot see into.
        _ => PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end)),
    };
    Some(MappedFile {
        path: path.to_owned(),
        open_path,
        base: first.start.wrapping_sub(first.offset),
        inode: first.inode,
        root,
    })
}

/// Where the file's first loadable segment (virtual address `first_vaddr`)
/// is mapped, as a bias to add to the object's virtual addresses.
pub fn load_bias(file: &MappedFile, first_vaddr: u64) -> u64 {
    file.base.wrapping_sub(first_vaddr & !0xfff)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_symlink_in_the_process_root_resolves_there_not_in_ours() {
        let root = std::env::temp_dir().join(format!("detector-maps-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        // Its `/lib` links to `/usr/lib`: resolved in the agent's root, the
        // name is the host's file, inode and all.
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        let host = std::fs::metadata("/usr/lib/os-release").expect("the host has /usr/lib/os-release");
        let named = |inode| MappedFile {
            path: "/lib/os-release".into(),
            open_path: root.join("lib/os-release"),
            base: 0,
            inode,
            root: root.clone(),
        };
        assert!(named(host.ino()).open().is_err(), "a host file was opened through the process's symlink");
        std::fs::write(root.join("usr/lib/os-release"), b"ID=inside\n").unwrap();
        let inside = std::fs::metadata(root.join("usr/lib/os-release")).unwrap();
        let mut read = String::new();
        named(inside.ino()).open().unwrap().read_to_string(&mut read).unwrap();
        assert_eq!(read, "ID=inside\n");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn parses_maps_lines() {
        let m = parse_line(
            "7f2a1c000000-7f2a1c1a2000 r-xp 00060000 fe:01 1234567                    /usr/lib/libpython3.12.so.1.0",
        )
        .unwrap();
        assert_eq!(m.start, 0x7f2a1c000000);
        assert_eq!(m.offset, 0x60000);
        assert_eq!(m.inode, 1234567);
        assert_eq!(m.path.as_deref(), Some("/usr/lib/libpython3.12.so.1.0"));
        assert!(m.is_file());
        let anon = parse_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]").unwrap();
        assert!(!anon.is_file());
        let spaced = parse_line("1000-2000 r--p 00000000 08:01 42 /opt/my app/python3").unwrap();
        assert_eq!(spaced.path.as_deref(), Some("/opt/my app/python3"));
    }
}
