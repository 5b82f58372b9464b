//! Analyses cached per binary: by file identity (device, inode, size and
//! change times), and across copies of one build (containers of the same
//! image) by a SHA-256 of the whole file, so a node running 200 processes of
//! one interpreter analyses it once. A build id is not trusted as a key: a
//! hostile image could carry a genuine one over other bytes and so hand its
//! analysis (or its refusal) to every tenant of that build. Refusals are
//! cached too. Analyses of different files run in parallel; processes of one
//! file started together wait for its first analysis.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use sha2::{Digest, Sha256};

use super::{Analysis, AnalysisError, analyze, elf::ElfImage, file};
use crate::pyproc::maps::MappedFile;

/// Most binaries remembered by default; beyond the cap the cache starts over.
pub const MAX_ENTRIES: usize = 256;

#[derive(Clone)]
enum Cached {
    Ok(Arc<Analysis>),
    NotPython(String),
    Unsupported(String),
}

impl Cached {
    fn result(&self) -> Result<Arc<Analysis>, AnalysisError> {
        match self {
            Cached::Ok(a) => Ok(a.clone()),
            Cached::NotPython(m) => Err(AnalysisError::NotPython(m.clone())),
            Cached::Unsupported(m) => Err(AnalysisError::Unsupported(m.clone())),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    /// One file as it is now: a write changes its change time.
    File { dev: u64, inode: u64, size: u64, mtime: (i64, i64), ctime: (i64, i64) },
    /// Any file with these bytes.
    Content([u8; 32]),
}

/// Analyses of new files made at once. One holds its file (at most
/// `file::MAX_FILE`, 64 MiB) and the DWARF parsed from it: about 100 MB for
/// a 30 MB libpython with full debug information, measured, so about 210 MB
/// at the largest; the DaemonSet's memory limit (320 MiB) allows one.
const MAX_ANALYSING: usize = 1;

/// Room for [`MAX_ANALYSING`] analyses: waiting for it blocks only the
/// decision that needs it (on the blocking pool), never the agent loop.
#[derive(Default)]
struct Room {
    used: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Room {
    fn take(&self) -> RoomTaken<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= MAX_ANALYSING {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        RoomTaken(self)
    }
}

struct RoomTaken<'a>(&'a Room);

impl Drop for RoomTaken<'_> {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// A cache of analyses, shared by every process watcher.
pub struct AnalysisCache {
    room: Room,
    entries: Mutex<HashMap<Key, Cached>>,
    /// One lock per file being analysed.
    analysing: Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    max_entries: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    resets: AtomicU64,
}

impl Default for AnalysisCache {
    fn default() -> Self {
        AnalysisCache::new(MAX_ENTRIES)
    }
}

impl AnalysisCache {
    /// An empty cache of at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        AnalysisCache {
            room: Room::default(),
            entries: Mutex::default(),
            analysing: Mutex::default(),
            max_entries: max_entries.max(2),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        }
    }

    /// Times the cache was full and started over.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The analysis of `file`, computed at most once per binary. The file
    /// is opened once: its identity, its digest and its analysis all come
    /// from the same descriptor.
    pub fn analyze(&self, mapped: &MappedFile, opened: &std::fs::File) -> Result<Arc<Analysis>, AnalysisError> {
        let io = |source| AnalysisError::Io { path: mapped.open_path.clone(), source };
        let md = opened.metadata().map_err(io)?;
        let file_key = Key::File {
            dev: md.dev(),
            inode: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        };
        if let Some(r) = self.lookup(&file_key) {
            return r;
        }
        let turn = self.turn(&file_key);
        let result = {
            let _held = turn.lock().unwrap_or_else(|e| e.into_inner());
            match opened.try_clone() {
                Ok(reader) => {
                    self.lookup(&file_key).unwrap_or_else(|| self.analyse_new(mapped, reader, file_key.clone()))
                }
                Err(e) => Err(io(e)),
            }
        };
        self.analysing.lock().unwrap_or_else(|e| e.into_inner()).remove(&file_key);
        result
    }

    fn lookup(&self, key: &Key) -> Option<Result<Arc<Analysis>, AnalysisError>> {
        let found = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(found.result())
    }

    /// The lock of the file `key`: held while it is analysed.
    fn turn(&self, key: &Key) -> Arc<Mutex<()>> {
        self.analysing.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone()
    }

    /// Reads `opened` whole, and analyses it unless a file with the same
    /// bytes was.
    fn analyse_new(
        &self,
        mapped: &MappedFile,
        opened: std::fs::File,
        file_key: Key,
    ) -> Result<Arc<Analysis>, AnalysisError> {
        let _room = self.room.take();
        let data =
            file::read_capped(opened).map_err(|source| AnalysisError::Io { path: mapped.open_path.clone(), source })?;
        let content_key = Key::Content(Sha256::digest(&data).into());
        let found = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(&content_key).cloned();
        if let Some(found) = found {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.insert([file_key], &found);
            return found.result();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let cached = match ElfImage::parse(data).and_then(|elf| analyze(&elf, &mapped.path, &mapped.root, None)) {
            Ok(a) => Cached::Ok(Arc::new(a)),
            Err(AnalysisError::NotPython(m) | AnalysisError::NotElf(m)) => Cached::NotPython(m),
            Err(AnalysisError::Unsupported(m)) => Cached::Unsupported(m),
            Err(e @ AnalysisError::Io { .. }) => return Err(e),
        };
        self.insert([file_key, content_key], &cached);
        cached.result()
    }

    fn insert<const N: usize>(&self, keys: [Key; N], cached: &Cached) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() + N > self.max_entries {
            entries.clear();
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        for k in keys {
            entries.insert(k, cached.clone());
        }
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(path: &std::path::Path) -> MappedFile {
        let inode = std::fs::metadata(path).unwrap().ino();
        MappedFile { path: path.display().to_string(), open_path: path.to_owned(), base: 0, inode, root: "/".into() }
    }

    fn analyze(cache: &AnalysisCache, path: &std::path::Path) -> Result<Arc<Analysis>, AnalysisError> {
        let m = mapped(path);
        cache.analyze(&m, &m.open().unwrap())
    }

    #[test]
    fn a_binary_is_analysed_once_and_a_lookalike_on_its_own() {
        // A small ELF with a build id (a test binary may exceed the size cap).
        let exe = std::path::PathBuf::from("/usr/bin/true");
        let cache = AnalysisCache::default();
        for _ in 0..3 {
            // Not Python: the refusal is cached like an analysis.
            assert!(matches!(analyze(&cache, &exe), Err(AnalysisError::NotPython(_))));
        }
        assert_eq!(cache.stats(), (2, 1));
        let dir = std::env::temp_dir().join(format!("detector-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A copy (another inode, the same bytes): found by its content.
        let copy = dir.join("copy");
        std::fs::copy(&exe, &copy).unwrap();
        assert!(analyze(&cache, &copy).is_err());
        assert_eq!(cache.stats(), (3, 1));
        // Its build id and all but one byte: analysed on its own.
        let mut bytes = std::fs::read(&exe).unwrap();
        *bytes.last_mut().unwrap() ^= 0xff;
        let lookalike = dir.join("lookalike");
        std::fs::write(&lookalike, bytes).unwrap();
        assert!(analyze(&cache, &lookalike).is_err());
        assert_eq!(cache.stats(), (3, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
