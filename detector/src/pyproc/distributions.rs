//! Which version of a distribution a process has installed, found as its
//! `importlib.metadata` finds it: the first `NAME-VERSION.dist-info` (or
//! `.egg-info`) whose normalized name is the one asked for, in the
//! directories of the process's own `sys.path`, in order, with `Version:`
//! read from its metadata. Read inside the process's root (containers), and
//! bounded: a hostile `sys.path` or site directory costs a fixed amount.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname};
use crate::{
    interp::file::{list_in_root, read_head_in_root},
    sources::affected::normalize,
};

mod zipped;

/// `sys.path` entries looked at.
pub(crate) const MAX_PATHS: usize = 64;
/// Names listed per directory (or archive).
const MAX_ENTRIES: usize = 8192;
/// Metadata files read per search.
const MAX_READS: usize = 64;
/// Bytes of a metadata file read: the headers come first.
const MAX_METADATA: u64 = 64 << 10;

/// What a process has of a distribution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Installed {
    /// This version, from this metadata file (as the process names it).
    Found {
        /// `Version:` of its metadata.
        version: String,
        /// The metadata file.
        metadata: PathBuf,
    },
    /// No directory of its `sys.path` has it.
    Missing,
    /// Its metadata could not be read, or the search was cut short.
    Unknown {
        /// Why.
        why: String,
    },
}

/// What `p` has of `names` (normalized): its `sys.path` read from its
/// memory, searched inside its root.
pub(crate) fn installed(
    p: &PythonProcess,
    names: &BTreeSet<String>,
) -> Result<BTreeMap<String, Installed>, ProcessError> {
    let sys_path = match p.runtime() {
        Some(runtime) => {
            let mem = ProcessMemory::open(p.pid)?;
            sys_path(&Objects::of(p, &mem), runtime)?
        }
        None => Vec::new(),
    };
    Ok(find(Path::new(&format!("/proc/{}/root", p.pid)), &sys_path, names))
}

/// The main interpreter's `sys.path`: its string entries, at most
/// [`MAX_PATHS`] + 1 (so that a longer one shows).
pub(crate) fn sys_path(objs: &Objects<'_>, runtime: u64) -> Result<Vec<String>, ProcessError> {
    let globals = qualname::module_globals(objs, runtime, "sys")?;
    // The main interpreter's is the last: subinterpreters come first.
    let Some(&sys) = globals.last() else { return Ok(Vec::new()) };
    let Some(path) = objs.dict_get(sys, "path")? else { return Ok(Vec::new()) };
    if objs.type_name(path)? != "list" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in objs.list_items(path, MAX_PATHS + 1)? {
        if objs.type_name(item)? == "str" {
            out.push(objs.str(item)?);
        }
    }
    Ok(out)
}

/// The version of each of `names` (normalized) installed for a process
/// whose root is `root` and whose `sys.path` is `sys_path`.
pub(crate) fn find(root: &Path, sys_path: &[String], names: &BTreeSet<String>) -> BTreeMap<String, Installed> {
    if sys_path.is_empty() {
        let why = "sys.path is empty (the interpreter is not initialized yet)";
        return names.iter().map(|n| (n.clone(), Installed::Unknown { why: why.into() })).collect();
    }
    let mut search = Search { root, names, found: BTreeMap::new(), reads: 0, cut: None };
    let mut seen = BTreeSet::new();
    for entry in sys_path.iter().take(MAX_PATHS) {
        if search.found.len() == names.len() {
            break;
        }
        // An entry listed again finds nothing new.
        if seen.insert(entry) {
            search.directory(entry);
        }
    }
    if sys_path.len() > MAX_PATHS {
        search
            .cut
            .get_or_insert(format!("sys.path has {} entries; the first {MAX_PATHS} were searched", sys_path.len()));
    }
    names
        .iter()
        .map(|n| {
            let installed = search.found.remove(n).unwrap_or_else(|| match &search.cut {
                Some(why) => Installed::Unknown { why: why.clone() },
                None => Installed::Missing,
            });
            (n.clone(), installed)
        })
        .collect()
}

struct Search<'a> {
    root: &'a Path,
    names: &'a BTreeSet<String>,
    found: BTreeMap<String, Installed>,
    reads: usize,
    /// Why the search may have missed something.
    cut: Option<String>,
}

impl Search<'_> {
    /// Looks in one `sys.path` entry: a directory or a zip archive,
    /// absolute (a relative entry is the process's working directory, which
    /// it may change).
    fn directory(&mut self, entry: &str) {
        let dir = Path::new(entry);
        if !dir.is_absolute() {
            return;
        }
        let (listed, more) = match list_in_root(self.root, dir, MAX_ENTRIES) {
            Ok(listed) => listed,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return self.archive(dir),
            // Missing entries are common (`python312.zip`).
            Err(_) => return,
        };
        if more {
            self.cut.get_or_insert(format!("{entry} has more than {MAX_ENTRIES} entries; the first were searched"));
        }
        for name in listed {
            let Some(name) = name.to_str() else { continue };
            let Some((dist, metadata)) = metadata_of(name) else { continue };
            let dist = normalize(dist);
            if !self.names.contains(&dist) || self.found.contains_key(&dist) {
                continue;
            }
            let path = dir.join(name).join(metadata);
            let installed = self.read(&path);
            self.found.insert(dist, installed);
        }
    }

    /// Looks in a zip archive on `sys.path` (a zipapp).
    fn archive(&mut self, path: &Path) {
        if self.reads == MAX_READS {
            return;
        }
        self.reads += 1;
        let (names, found) = (self.names, &self.found);
        match zipped::search(self.root, path, |d| names.contains(d) && !found.contains_key(d)) {
            Ok(found) => self.found.extend(found),
            // What it holds is not known: nothing is missing for sure.
            Err(e) => {
                self.cut.get_or_insert(format!("{}: {e}", path.display()));
            }
        }
    }

    fn read(&mut self, path: &Path) -> Installed {
        if self.reads == MAX_READS {
            return Installed::Unknown { why: format!("more than {MAX_READS} metadata files to read") };
        }
        self.reads += 1;
        match read_head_in_root(self.root, path, MAX_METADATA) {
            Ok(bytes) => match version_header(&bytes) {
                Some(version) => Installed::Found { version, metadata: path.to_owned() },
                None => Installed::Unknown { why: format!("{}: no Version header", path.display()) },
            },
            Err(e) => Installed::Unknown { why: format!("{}: {e}", path.display()) },
        }
    }
}

/// The distribution a metadata directory name is for, and the file in it
/// that holds its headers: `NAME-VERSION.dist-info` (`METADATA`), or
/// `NAME-VERSION[-pyX.Y].egg-info` or `NAME.egg-info` (`PKG-INFO`).
fn metadata_of(name: &str) -> Option<(&str, &'static str)> {
    if let Some(stem) = name.strip_suffix(".dist-info") {
        return Some((stem.split('-').next()?, "METADATA"));
    }
    let stem = name.strip_suffix(".egg-info")?;
    Some((stem.split('-').next()?, "PKG-INFO"))
}

/// `Version:` among the headers (those before the first empty line).
fn version_header(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("detector-dists-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let path = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_first_directory_of_sys_path_that_has_it_wins() {
        let root = tree(&[
            (
                "/user/site/Six-1.16.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: six\nVersion: 1.16.0\n\nVersion: 9\n",
            ),
            ("/venv/site/six-1.17.0.dist-info/METADATA", "Name: six\nVersion: 1.17.0\n"),
            ("/venv/site/Jinja2-3.1.2.dist-info/METADATA", "Name: Jinja2\nVersion: 3.1.2\n"),
            ("/venv/site/zope.interface-6.0-py3.12.egg-info/PKG-INFO", "Name: zope.interface\nVersion: 6.0\n"),
        ]);
        let path: Vec<String> = ["relative", "/missing", "/user/site", "/venv/site"].map(String::from).to_vec();
        let found = find(&root, &path, &names(&["six", "jinja2", "zope-interface", "requests"]));
        let version = |n: &str| match &found[n] {
            Installed::Found { version, .. } => version.clone(),
            other => panic!("{n}: {other:?}"),
        };
        assert_eq!(version("six"), "1.16.0");
        assert_eq!(version("jinja2"), "3.1.2");
        assert_eq!(version("zope-interface"), "6.0");
        assert_eq!(found["requests"], Installed::Missing);
    }

    #[test]
    fn unreadable_metadata_and_cut_searches_are_unknown_never_missing() {
        let root = tree(&[("/site/six-1.0.dist-info/METADATA", "Name: six\n\nVersion: 1.0\n")]);
        let found = find(&root, &["/site".into()], &names(&["six"]));
        assert!(matches!(&found["six"], Installed::Unknown { why } if why.contains("no Version")), "{found:?}");
        let long: Vec<String> = (0..MAX_PATHS + 1).map(|i| format!("/nowhere/{i}")).collect();
        let found = find(&root, &long, &names(&["six"]));
        assert!(matches!(&found["six"], Installed::Unknown { why } if why.contains("entries")), "{found:?}");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = tree(&[("/site/six-1.0.dist-info/METADATA", "Version: 1.0\n")]);
        let outside = tree(&[("/etc/six-6.6.dist-info/METADATA", "Version: 6.6\n")]);
        std::os::unix::fs::symlink(outside.join("etc"), root.join("link")).unwrap();
        // `/link` points outside the root by its absolute name: inside the
        // root, that name does not exist.
        let found = find(&root, &["/link".into(), "/site".into()], &names(&["six"]));
        assert!(matches!(&found["six"], Installed::Found { version, .. } if version == "1.0"), "{found:?}");
    }
}
