//! Entry points for the fuzz targets (`detector/fuzz`, run by `cargo xtask
//! fuzz`): each feeds arbitrary bytes to one parser of input the agent does
//! not control. The committed corpus is replayed by this module's test, so
//! every crash once found stays a regression test.

use std::path::Path;

/// An interpreter image, analysed as if a process had mapped it (no debug
/// files: the root does not exist).
pub fn elf(data: &[u8]) {
    if let Ok(image) = crate::interp::elf::ElfImage::parse(data.to_vec()) {
        let _ = crate::interp::analyze(&image, "/fuzz/libpython3.12.so.1.0", Path::new("/nonexistent-root"), None);
    }
}

/// A targets payload (from Remote Configuration or a file).
pub fn payload(data: &[u8]) {
    let _ = crate::sources::payload::parse(data);
}

/// A Remote Configuration response, checked and applied by a new client.
pub fn rc_response(data: &[u8]) {
    if let Ok(response) = serde_json::from_slice(data) {
        let identity =
            crate::rc::client::Identity { service: String::new(), env: String::new(), app_version: String::new() };
        let _ = crate::rc::client::RcClient::new(identity).update(response);
    }
}

/// A file of `/proc/PID/` or bytes of a process's memory, picked by the
/// first byte: its environment, its cgroup, a line of its maps, or its
/// `_Py_DebugOffsets` header.
pub fn proc_files(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 4 {
        0 => drop(crate::agent::discovery::Environ::parse(rest)),
        1 => drop(crate::agent::tenant::Tenant::from_cgroup_file(&String::from_utf8_lossy(rest))),
        2 => String::from_utf8_lossy(rest).lines().for_each(|l| drop(crate::pyproc::maps::parse_line(l))),
        _ => drop(crate::interp::debug_offsets::header(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed input, fed to its target.
    #[test]
    fn the_committed_corpus_runs_clean() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 4] =
            [("elf", elf), ("payload", payload), ("rc_response", rc_response), ("proc_files", proc_files)];
        for (name, target) in targets {
            let dir = corpus.join(name);
            let inputs: Vec<_> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).collect();
            assert!(!inputs.is_empty(), "{name} has a corpus");
            for input in inputs {
                let path = input.unwrap().path();
                target(&std::fs::read(&path).unwrap());
            }
        }
    }
}
