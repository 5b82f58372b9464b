//! Distributions inside a zip archive on `sys.path` (a zipapp):
//! `NAME-VERSION.dist-info/METADATA` at the archive's top, as `zipimport`
//! serves them. The archive is the process's: it is opened inside its
//! root, its central directory is read whole only if it is small, each
//! record is bounds-checked, and a metadata file is read (and inflated)
//! within a cap.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use super::{Installed, MAX_ENTRIES, MAX_METADATA, metadata_of, version_header};
use crate::{interp::file::open_file_in_root, sources::affected::normalize};

/// The largest archive opened.
const MAX_ARCHIVE: u64 = 512 << 20;
/// The largest central directory read.
const MAX_DIRECTORY: u32 = 4 << 20;
/// The most compressed bytes read for one metadata file.
const MAX_COMPRESSED: u32 = 1 << 20;
/// End of central directory record: signature and fixed size (a comment of
/// up to 64 KiB may follow it).
const EOCD: ([u8; 4], usize) = ([0x50, 0x4b, 0x05, 0x06], 22);
/// Central directory file header.
const CENTRAL: ([u8; 4], usize) = ([0x50, 0x4b, 0x01, 0x02], 46);
/// Local file header.
const LOCAL: ([u8; 4], usize) = ([0x50, 0x4b, 0x03, 0x04], 30);

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_at(file: &mut File, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; len];
    file.seek(SeekFrom::Start(at)).and_then(|_| file.read_exact(&mut buf)).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// The archive's central directory, and where the archive starts in the
/// file (after a preamble such as a zipapp's `#!` line).
fn directory(file: &mut File, len: u64) -> Result<(Vec<u8>, u64), String> {
    let tail_len = len.min((EOCD.1 + usize::from(u16::MAX)) as u64);
    let tail = read_at(file, len - tail_len, tail_len as usize)?;
    let at = (0..tail.len().saturating_sub(EOCD.1 - 1))
        .rev()
        .find(|&i| tail[i..i + 4] == EOCD.0)
        .ok_or("no end of central directory record")?;
    let eocd = &tail[at..at + EOCD.1];
    let (entries, size, offset) = (u16_at(eocd, 10), u32_at(eocd, 12), u32_at(eocd, 16));
    if entries == usize::from(u16::MAX) || size == u32::MAX || offset == u32::MAX {
        return Err("a zip64 archive (not read)".into());
    }
    if size > MAX_DIRECTORY || entries > MAX_ENTRIES {
        return Err(format!("a central directory of {entries} entries and {size} bytes (more than the caps)"));
    }
    // The directory ends where its end record begins.
    let eocd_at = len - tail_len + at as u64;
    let start = eocd_at.checked_sub(u64::from(size)).ok_or("a central directory larger than the file")?;
    let base = start.checked_sub(u64::from(offset)).ok_or("a central directory before the archive's start")?;
    Ok((read_at(file, start, size as usize)?, base))
}

/// The distributions `wanted` (by normalized name) says to read, found in
/// the archive at `path`: (normalized name, what it has). `Err` if `path`
/// is no zip archive read within the caps.
pub(super) fn search(
    root: &Path,
    path: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Installed)>, String> {
    let mut file = open_file_in_root(root, path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.len() > MAX_ARCHIVE {
        return Err(format!("larger than {MAX_ARCHIVE} bytes"));
    }
    let (cd, base) = directory(&mut file, meta.len())?;
    let mut found: Vec<(String, Installed)> = Vec::new();
    let mut at = 0;
    while at + CENTRAL.1 <= cd.len() && cd[at..at + 4] == CENTRAL.0 {
        let record = &cd[at..];
        let (method, compressed, local) = (u16_at(record, 10), u32_at(record, 20), u32_at(record, 42));
        let (name_len, extra, comment) = (u16_at(record, 28), u16_at(record, 30), u16_at(record, 32));
        let Some(name) = record.get(CENTRAL.1..CENTRAL.1 + name_len) else { break };
        at += CENTRAL.1 + name_len + extra + comment;
        // Top-level metadata directories only, and their headers file.
        let Some((dir, file_name)) = std::str::from_utf8(name).ok().and_then(|n| n.split_once('/')) else { continue };
        let Some((dist, headers)) = metadata_of(dir) else { continue };
        let dist = normalize(dist);
        if file_name != headers || !wanted(&dist) || found.iter().any(|(d, _)| *d == dist) {
            continue;
        }
        let shown = format!("{}/{dir}/{file_name}", path.display());
        let installed = match entry(&mut file, base + u64::from(local), method, compressed) {
            Ok(bytes) => match version_header(&bytes) {
                Some(version) => Installed::Found { version, metadata: shown.into() },
                None => Installed::Unknown { why: format!("{shown}: no Version header") },
            },
            Err(e) => Installed::Unknown { why: format!("{shown}: {e}") },
        };
        found.push((dist, installed));
    }
    Ok(found)
}

/// The first [`MAX_METADATA`] bytes of the entry whose local header is at
/// `at`, stored or deflated.
fn entry(file: &mut File, at: u64, method: usize, compressed: u32) -> Result<Vec<u8>, String> {
    let header = read_at(file, at, LOCAL.1)?;
    if header[..4] != LOCAL.0 {
        return Err("no local header where the directory says".into());
    }
    let data = at + (LOCAL.1 + u16_at(&header, 26) + u16_at(&header, 28)) as u64;
    let raw = read_at(file, data, compressed.min(MAX_COMPRESSED) as usize)?;
    let mut out = Vec::new();
    match method {
        0 => out.extend(raw.iter().take(MAX_METADATA as usize)),
        8 => {
            let inflated = flate2::read::DeflateDecoder::new(&raw[..]).take(MAX_METADATA).read_to_end(&mut out);
            inflated.map_err(|e| format!("inflating: {e}"))?;
        }
        m => return Err(format!("compression method {m} (stored and deflated only)")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zip archive of `files` (name, data, deflated), after `preamble`.
    fn archive(preamble: &[u8], files: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut out = preamble.to_vec();
        let mut cd = Vec::new();
        for (name, data, deflate) in files {
            let local = (out.len() - preamble.len()) as u32;
            let body = if *deflate {
                let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                std::io::Write::write_all(&mut e, data).unwrap();
                e.finish().unwrap()
            } else {
                data.to_vec()
            };
            let method: u16 = if *deflate { 8 } else { 0 };
            let header = |sig: [u8; 4], central: bool| {
                let mut h = sig.to_vec();
                if central {
                    h.extend(20u16.to_le_bytes());
                }
                h.extend(20u16.to_le_bytes());
                h.extend(0u16.to_le_bytes());
                h.extend(method.to_le_bytes());
                h.extend([0; 8]); // time, date, crc
                h.extend((body.len() as u32).to_le_bytes());
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((name.len() as u16).to_le_bytes());
                h.extend(0u16.to_le_bytes());
                if central {
                    h.extend([0; 8]); // comment, disk, attributes
                    h.extend([0; 2]);
                    h.extend(local.to_le_bytes());
                }
                h.extend(name.as_bytes());
                h
            };
            out.extend(header(LOCAL.0, false));
            out.extend(&body);
            cd.extend(header(CENTRAL.0, true));
        }
        let offset = (out.len() - preamble.len()) as u32;
        out.extend(&cd);
        out.extend(EOCD.0);
        out.extend([0; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((cd.len() as u32).to_le_bytes());
        out.extend(offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn metadata_is_read_from_stored_and_deflated_entries_after_a_preamble() {
        let root = std::env::temp_dir().join(format!("detector-zipped-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let files: [(&str, &[u8], bool); 3] = [
            ("six-1.16.0.dist-info/METADATA", b"Name: six\nVersion: 1.16.0\n", false),
            ("Jinja2-3.1.2.dist-info/METADATA", b"Name: Jinja2\nVersion: 3.1.2\n\nbody", true),
            ("nested/other-9.dist-info/METADATA", b"Version: 9\n", false),
        ];
        std::fs::write(root.join("app.pyz"), archive(b"#!/usr/bin/env python3\n", &files)).unwrap();
        let found = search(&root, Path::new("/app.pyz"), |_| true).unwrap();
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
        // An end record claiming a huge directory is refused before it is read.
        let mut huge = EOCD.0.to_vec();
        huge.extend([0, 0, 0, 0, 0xfe, 0xff, 0xfe, 0xff, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]);
        std::fs::write(root.join("huge.zip"), huge).unwrap();
        let e = search(&root, Path::new("/huge.zip"), |_| true).err().unwrap();
        assert!(e.contains("more than the caps"), "{e}");
        // One whose directory would start before the file does.
        let mut short = EOCD.0.to_vec();
        short.extend([0, 0, 0, 0, 1, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]);
        std::fs::write(root.join("short.zip"), short).unwrap();
        assert!(search(&root, Path::new("/short.zip"), |_| true).is_err());
    }
}
