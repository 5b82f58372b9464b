//! A process's environment, as the kernel shows it: the block it was
//! exec'd with, read once per question and bounded.

use std::io::Read;

use super::ProcessError;

/// Most bytes of a process's environment read.
const MAX_ENVIRON: u64 = 4 << 20;

/// The environment of `pid` as it was at exec (its first [`MAX_ENVIRON`]
/// bytes: the kernel bounds it near there anyway), NUL-separated.
pub(crate) fn environ_block(pid: u32) -> Result<Vec<u8>, ProcessError> {
    let file = std::fs::File::open(format!("/proc/{pid}/environ")).map_err(|e| ProcessError::io(pid, e))?;
    let mut block = Vec::new();
    file.take(MAX_ENVIRON).read_to_end(&mut block).map_err(|e| ProcessError::io(pid, e))?;
    Ok(block)
}
