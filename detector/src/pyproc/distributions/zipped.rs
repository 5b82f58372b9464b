//! Distributions inside a zip archive on `sys.path` (a zipapp, an egg):
//! `NAME-VERSION.dist-info/METADATA` at the archive's top, as `zipimport`
//! serves them. The archive is opened inside the process's root and read
//! within caps: its size, the entries looked at, the bytes inflated.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use super::{Installed, MAX_ENTRIES, MAX_METADATA, metadata_of, version_header};
use crate::{interp::file::open_in_root, sources::affected::normalize};

/// The largest archive opened.
const MAX_ARCHIVE: u64 = 512 << 20;
/// The largest central directory parsed: the zip reader holds it whole,
/// and an archive of the process's making could claim millions of entries.
const MAX_DIRECTORY: u32 = 4 << 20;
/// End of central directory record: signature, and its fixed size (a
/// comment of up to 64 KiB may follow it).
const EOCD_SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
const EOCD_LEN: usize = 22;

/// What an archive holds of the distributions asked for.
pub(super) struct Holds {
    /// (normalized name, what it has).
    pub(super) found: Vec<(String, Installed)>,
    /// Why the search was cut short, if it was.
    pub(super) cut: Option<String>,
}

/// The distributions `wanted` (by normalized name) says to read, found in
/// the archive at `path`. `Err` if `path` is no readable zip.
pub(super) fn search(root: &Path, path: &Path, wanted: impl Fn(&str) -> bool) -> Result<Holds, String> {
    let file = open_in_root(root, path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_ARCHIVE {
        return Err(format!("not a regular file of at most {MAX_ARCHIVE} bytes"));
    }
    let mut file = file;
    check_directory(&mut file, meta.len())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| e.to_string())?;
    let cut = (zip.len() > MAX_ENTRIES)
        .then(|| format!("{} has more than {MAX_ENTRIES} entries; the first were searched", path.display()));
    let mut found = Vec::new();
    for i in 0..zip.len().min(MAX_ENTRIES) {
        let Some(Ok(name)) = zip.name_for_index(i).map(|n| n.map(|n| n.into_owned())) else { continue };
        // Top-level metadata directories only, and their headers file.
        let Some((dir, file)) = name.split_once('/') else { continue };
        let Some((dist, headers)) = metadata_of(dir) else { continue };
        let dist = normalize(dist);
        if file != headers || !wanted(&dist) || found.iter().any(|(d, _)| *d == dist) {
            continue;
        }
        let at = format!("{}/{name}", path.display());
        let installed = match zip.by_index(i) {
            Ok(entry) => {
                let mut bytes = Vec::new();
                match entry.take(MAX_METADATA).read_to_end(&mut bytes) {
                    Ok(_) => match version_header(&bytes) {
                        Some(version) => Installed::Found { version, metadata: at.into() },
                        None => Installed::Unknown { why: format!("{at}: no Version header") },
                    },
                    Err(e) => Installed::Unknown { why: format!("{at}: {e}") },
                }
            }
            Err(e) => Installed::Unknown { why: format!("{at}: {e}") },
        };
        found.push((dist, installed));
    }
    Ok(Holds { found, cut })
}

/// Refuses an archive whose central directory is larger than the caps
/// allow (or that needs zip64 to say how large it is), before the zip
/// reader allocates it: from the end of central directory record.
fn check_directory(file: &mut File, len: u64) -> Result<(), String> {
    let tail_len = len.min((EOCD_LEN + u16::MAX as usize) as u64);
    let mut tail = vec![0; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len)).and_then(|_| file.read_exact(&mut tail)).map_err(|e| e.to_string())?;
    let at = (0..tail.len().saturating_sub(EOCD_LEN - 1))
        .rev()
        .find(|&i| tail[i..i + 4] == EOCD_SIGNATURE)
        .ok_or("no end of central directory record")?;
    let eocd = &tail[at..at + EOCD_LEN];
    let entries = u16::from_le_bytes([eocd[10], eocd[11]]);
    let size = u32::from_le_bytes([eocd[12], eocd[13], eocd[14], eocd[15]]);
    if entries == u16::MAX || size == u32::MAX {
        return Err("a zip64 archive (not read)".into());
    }
    if size > MAX_DIRECTORY || usize::from(entries) > MAX_ENTRIES {
        return Err(format!("a central directory of {entries} entries and {size} bytes (more than the caps)"));
    }
    file.rewind().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn metadata_is_read_from_stored_and_deflated_entries_after_a_preamble() {
        let root = std::env::temp_dir().join(format!("detector-zipped-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let mut bytes = b"#!/usr/bin/env python3\n".to_vec();
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let deflated = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("six-1.16.0.dist-info/METADATA", stored).unwrap();
        zip.write_all(b"Name: six\nVersion: 1.16.0\n").unwrap();
        zip.start_file("Jinja2-3.1.2.dist-info/METADATA", deflated).unwrap();
        zip.write_all(b"Name: Jinja2\nVersion: 3.1.2\n\nbody").unwrap();
        zip.start_file("nested/other-9.dist-info/METADATA", stored).unwrap();
        zip.write_all(b"Version: 9\n").unwrap();
        bytes.extend(zip.finish().unwrap().into_inner());
        std::fs::write(root.join("app.pyz"), bytes).unwrap();
        let Holds { found, cut } = search(&root, Path::new("/app.pyz"), |_| true).unwrap();
        assert_eq!(cut, None);
        let versions: Vec<(String, String)> = found
            .into_iter()
            .map(|(d, i)| match i {
                Installed::Found { version, .. } => (d, version),
                other => panic!("{d}: {other:?}"),
            })
            .collect();
        assert_eq!(versions, [("six".into(), "1.16.0".into()), ("jinja2".into(), "3.1.2".into())]);
        std::fs::write(root.join("not.zip"), b"plain").unwrap();
        assert!(search(&root, Path::new("/not.zip"), |_| true).is_err());
        // An end record claiming a huge directory is refused before parsing.
        let mut huge = EOCD_SIGNATURE.to_vec();
        huge.extend([0, 0, 0, 0, 0xfe, 0xff, 0xfe, 0xff, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]);
        std::fs::write(root.join("huge.zip"), huge).unwrap();
        let e = search(&root, Path::new("/huge.zip"), |_| true).err().unwrap();
        assert!(e.contains("more than the caps"), "{e}");
    }
}
