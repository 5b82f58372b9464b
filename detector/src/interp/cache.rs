//! Analyses cached per binary: by (device, inode), and across copies of one
//! build (containers of the same image) by GNU build id, so a node running
//! 200 processes of one interpreter analyses it once. Refusals are cached too.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::{FileExt, MetadataExt},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{Analysis, AnalysisError, analyze, elf::ElfImage};
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
    Inode { dev: u64, inode: u64, size: u64, mtime: i64 },
    BuildId(Vec<u8>),
}

/// A cache of analyses, shared by every process watcher.
pub struct AnalysisCache {
    entries: Mutex<HashMap<Key, Cached>>,
    /// Held while a binary is analysed: processes of one image started
    /// together wait for the first analysis instead of repeating it.
    analysing: Mutex<()>,
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

    /// The analysis of `file`, computed at most once per binary.
    pub fn analyze(&self, file: &MappedFile) -> Result<Arc<Analysis>, AnalysisError> {
        let io = |source| AnalysisError::Io { path: file.open_path.clone(), source };
        let md = std::fs::metadata(&file.open_path).map_err(io)?;
        let inode_key = Key::Inode { dev: md.dev(), inode: md.ino(), size: md.size(), mtime: md.mtime() };
        let build_key = build_id(&file.open_path).map(Key::BuildId);
        let lookup = || {
            let entries = self.entries.lock().unwrap();
            let found = entries.get(&inode_key).or_else(|| build_key.as_ref().and_then(|k| entries.get(k)));
            found.map(|c| {
                self.hits.fetch_add(1, Ordering::Relaxed);
                c.result()
            })
        };
        if let Some(r) = lookup() {
            return r;
        }
        let _turn = self.analysing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = lookup() {
            return r;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let cached = match ElfImage::open(&file.open_path).and_then(|elf| analyze(&elf, &file.path, &file.root, None)) {
            Ok(a) => Cached::Ok(Arc::new(a)),
            Err(AnalysisError::NotPython(m) | AnalysisError::NotElf(m)) => Cached::NotPython(m),
            Err(AnalysisError::Unsupported(m)) => Cached::Unsupported(m),
            Err(e @ AnalysisError::Io { .. }) => return Err(e),
        };
        let mut entries = self.entries.lock().unwrap();
        if entries.len() + 2 > self.max_entries {
            entries.clear();
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        entries.insert(inode_key, cached.clone());
        if let Some(k) = build_key {
            entries.insert(k, cached.clone());
        }
        cached.result()
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

/// The GNU build id from the program headers' notes, reading only the
/// headers and the notes (not the whole, possibly huge, file).
pub fn build_id(path: &Path) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None; // not 64-bit little-endian
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().ok()?);
    let phentsize = u16::from_le_bytes(eh[54..56].try_into().ok()?) as u64;
    let phnum = u16::from_le_bytes(eh[56..58].try_into().ok()?) as u64;
    if phentsize < 56 || phnum > 256 {
        return None;
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize).ok()?;
        if u32::from_le_bytes(ph[0..4].try_into().ok()?) != 4 {
            continue; // PT_NOTE only
        }
        let off = u64::from_le_bytes(ph[8..16].try_into().ok()?);
        let size = u64::from_le_bytes(ph[32..40].try_into().ok()?).min(4096);
        let mut notes = vec![0u8; size as usize];
        f.read_exact_at(&mut notes, off).ok()?;
        if let Some(id) = find_build_id(&notes) {
            return Some(id);
        }
    }
    None
}

fn find_build_id(mut notes: &[u8]) -> Option<Vec<u8>> {
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let namesz = u32::from_le_bytes(notes[0..4].try_into().ok()?) as usize;
        let descsz = u32::from_le_bytes(notes[4..8].try_into().ok()?) as usize;
        let kind = u32::from_le_bytes(notes[8..12].try_into().ok()?);
        let desc_at = 12 + align4(namesz);
        let end = desc_at + align4(descsz);
        if end > notes.len() && desc_at + descsz > notes.len() {
            return None;
        }
        // NT_GNU_BUILD_ID with name "GNU\0".
        if kind == 3 && notes.get(12..12 + namesz) == Some(b"GNU\0") {
            return Some(notes[desc_at..desc_at + descsz].to_vec());
        }
        notes = notes.get(end..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_is_analysed_once() {
        let exe = std::env::current_exe().unwrap();
        let file = MappedFile { path: exe.display().to_string(), open_path: exe.clone(), base: 0, root: "/".into() };
        let cache = AnalysisCache::default();
        for _ in 0..3 {
            // Not Python: the refusal is cached like an analysis.
            assert!(matches!(cache.analyze(&file), Err(AnalysisError::NotPython(_))));
        }
        assert_eq!(cache.stats(), (2, 1));
    }

    #[test]
    fn build_id_matches_the_full_parser() {
        let exe = std::env::current_exe().unwrap();
        let full = ElfImage::open(&exe).unwrap().build_id;
        assert_eq!(build_id(&exe), full);
        assert!(build_id(Path::new("/proc/self/status")).is_none());
    }
}
