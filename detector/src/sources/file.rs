//! Payload files: a file, or every `*.json` in a directory, each one config
//! in the `SCA_DETECTION` shapes; re-read when they change. `builtin` names
//! the default compiled into the detector, so it works with no agent at all.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::warn;

use super::{Config, Delivery, Origin, Update, payload};

/// The name that selects the embedded default.
pub const BUILTIN: &str = "builtin";

/// The embedded default: standard-library functions with a security story
/// (deserialisation, archive extraction, process spawning, network access).
pub const BUILTIN_PAYLOAD: &str = include_str!("default-targets.json");

/// How often files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Most files read from one directory.
const MAX_FILES: usize = 256;

/// Reads every config named by `paths` (files, directories or `builtin`).
/// A file that cannot be read or parsed is a config with an error.
pub fn read(paths: &[PathBuf]) -> Vec<Config> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == BUILTIN {
            out.push(config(BUILTIN.into(), Ok(BUILTIN_PAYLOAD.as_bytes().to_vec())));
        } else if p.is_dir() {
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
            files.retain(|f| f.extension().is_some_and(|e| e == "json") && f.is_file());
            files.sort();
            files.truncate(MAX_FILES);
            out.extend(files.iter().map(|f| read_file(f)));
        } else {
            out.push(read_file(p));
        }
    }
    out
}

fn read_file(p: &Path) -> Config {
    config(p.display().to_string(), std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
}

fn config(name: String, bytes: Result<Vec<u8>, String>) -> Config {
    let targets = bytes.and_then(|b| payload::parse(&b).map_err(|e| e.to_string()));
    if let Err(e) = &targets {
        warn!(config = %name, error = %e, "rejected target file");
    }
    Config { origin: Origin::File, name, version: None, targets }
}

/// Publishes the configs of `paths` now and whenever they change.
pub async fn watch(paths: Vec<PathBuf>, tx: mpsc::Sender<Delivery>) {
    let mut last: Option<Vec<Config>> = None;
    loop {
        let now = read(&paths);
        if last.as_ref() != Some(&now) {
            if tx.send(Update { origin: Origin::File, configs: now.clone() }.into()).await.is_err() {
                return;
            }
            last = Some(now);
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_default_parses() {
        let c = read(&[PathBuf::from(BUILTIN)]);
        assert!(c[0].targets.as_ref().unwrap().targets.len() >= 5);
    }

    #[test]
    fn a_directory_of_payloads() {
        let dir = std::env::temp_dir().join(format!("detector-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.json"), r#"{"targets": ["m:f"]}"#).unwrap();
        std::fs::write(dir.join("b.json"), "{").unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let c = read(std::slice::from_ref(&dir));
        assert_eq!(c.len(), 2);
        assert!(c[0].targets.is_ok() && c[1].targets.as_ref().unwrap_err().contains("invalid JSON"));
        let missing = read(&[dir.join("nope.json")]);
        assert!(missing[0].targets.as_ref().unwrap_err().contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
