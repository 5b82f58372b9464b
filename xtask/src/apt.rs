//! Host packages xtask needs from Debian (debootstrap, a clang for the
//! tail-calling interpreter builds), installed on first use.

use std::process::Command;

use anyhow::Result;

use crate::sh;

/// Installs `package` unless `probe` (a command that exists once it is) runs.
pub fn ensure(package: &str, probe: &str) -> Result<()> {
    if Command::new(probe).arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing {package}");
    let install =
        || sh(Command::new("apt-get").args(["install", "-y", "-q", package]).env("DEBIAN_FRONTEND", "noninteractive"));
    // A fresh machine's package lists may predate the package.
    install().or_else(|_| {
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        install()
    })
}
