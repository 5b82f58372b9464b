//! The Python environments the dependency-version tests run in, made once
//! under the cache directory from PyPI: one distribution (`six`) at two
//! versions in two virtualenvs, a `--user` install of it, a zipapp bundling
//! it, and an editable install of a local project. Each is made with
//! pyenv's 3.12.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{cache_dir, root, sh};

/// What each environment holds; a change makes them again.
const SPEC: &str =
    "old: six==1.16.0; new: six==1.17.0; user: six==1.16.0; app.pyz: six==1.16.0; editable: editable-demo 0.3.0";

/// The directory holding `old`, `new` and `editable` (virtualenvs),
/// `userbase` (a `PYTHONUSERBASE`) and `app.pyz` (a compressed zipapp),
/// making them on first use.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir().join("dist-versions");
    let stamp = dir.join(".installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == SPEC) {
        return Ok(dir);
    }
    eprintln!("xtask: making the dependency-version test environments in {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (_, python) = detector_tests::interpreters::pyenv_python(12);
    let pip = |venv: &str, args: &[&str]| -> Result<()> {
        let v = dir.join(venv);
        sh(Command::new(&python).args(["-m", "venv"]).arg(&v))?;
        sh(Command::new(v.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(args))
    };
    pip("old", &["six==1.16.0"])?;
    pip("new", &["six==1.17.0"])?;
    let demo = root().join("xtask/fixtures/editable-demo");
    pip("editable", &["-e", &demo.display().to_string()])?;
    // `--user` from the interpreter itself, into a user base of our own.
    sh(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--user", "six==1.16.0"])
        .env("PYTHONUSERBASE", dir.join("userbase")))?;
    let bundle = dir.join("app");
    sh(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(&bundle)
        .arg("six==1.16.0"))?;
    sh(Command::new(&python)
        .args(["-m", "zipapp", "--compress", "--main", "six:ensure_str", "--output"])
        .arg(dir.join("app.pyz"))
        .arg(&bundle))?;
    std::fs::write(&stamp, SPEC)?;
    Ok(dir)
}
