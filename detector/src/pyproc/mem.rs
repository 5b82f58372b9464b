//! Reading another process's memory through `/proc/PID/mem`. Each handle is
//! one look (a walk of its objects, a resolution, an attach) with a work
//! budget: the process owns what is read, and may make it as large or as
//! cyclic as it likes, but it can only make its own look end early.

use std::{
    cell::Cell,
    fs::File,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use super::ProcessError;

/// Most reads in one look (the largest legitimate one, a rescan of a big
/// application's `sys.modules` for a catalog, takes tens of thousands).
const MAX_READS: u32 = 200_000;
/// Most bytes read in one look.
const MAX_BYTES: u64 = 64 << 20;
/// Longest a look may take.
const MAX_TIME: Duration = Duration::from_millis(500);

/// Whether `reads` reads of `bytes` bytes are more than a look may make.
pub(crate) fn exceeds(reads: u32, bytes: u64) -> bool {
    reads > MAX_READS || bytes > MAX_BYTES
}

/// Read access to a process's address space, for one look.
pub struct ProcessMemory {
    pid: u32,
    file: File,
    reads: Cell<u32>,
    bytes: Cell<u64>,
    opened: Instant,
}

impl ProcessMemory {
    /// Opens `/proc/PID/mem` (needs ptrace access: root or CAP_SYS_PTRACE).
    pub fn open(pid: u32) -> Result<Self, ProcessError> {
        let file = File::open(format!("/proc/{pid}/mem")).map_err(|e| ProcessError::io(pid, e))?;
        Ok(ProcessMemory { pid, file, reads: Cell::new(0), bytes: Cell::new(0), opened: Instant::now() })
    }

    /// Counts a read of `len` bytes against the look's budget.
    fn spend(&self, len: usize) -> Result<(), ProcessError> {
        let (reads, bytes) = (self.reads.get() + 1, self.bytes.get().saturating_add(len as u64));
        self.reads.set(reads);
        self.bytes.set(bytes);
        // The clock is read every 1024 reads: reads cost about a microsecond.
        let late = reads % 1024 == 0 && self.opened.elapsed() > MAX_TIME;
        if reads > MAX_READS || bytes > MAX_BYTES || late {
            let ms = self.opened.elapsed().as_millis() as u64;
            return Err(ProcessError::OverBudget { pid: self.pid, reads, bytes, ms });
        }
        Ok(())
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fills `buf` from `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProcessError> {
        if addr == 0 {
            return Err(ProcessError::BadAddress { pid: self.pid, addr });
        }
        self.spend(buf.len())?;
        self.file.read_exact_at(buf, addr).map_err(|_| ProcessError::BadAddress { pid: self.pid, addr })
    }

    /// `len` bytes at `addr`.
    pub fn bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, ProcessError> {
        let mut v = vec![0; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// A little-endian `u64` at `addr`.
    pub fn u64(&self, addr: u64) -> Result<u64, ProcessError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian `i64` at `addr`.
    pub fn i64(&self, addr: u64) -> Result<i64, ProcessError> {
        self.u64(addr).map(|v| v as i64)
    }

    /// A little-endian `u32` at `addr`.
    pub fn u32(&self, addr: u64) -> Result<u32, ProcessError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A byte at `addr`.
    pub fn u8(&self, addr: u64) -> Result<u8, ProcessError> {
        let mut b = [0; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    /// Fills each buffer from its address in one system call
    /// (`process_vm_readv`, no file): whether every byte was read.
    pub fn read_many(&self, parts: &mut [(u64, &mut [u8])]) -> bool {
        let total: usize = parts.iter().map(|(_, b)| b.len()).sum();
        if self.spend(total).is_err() {
            return false;
        }
        let local: Vec<libc::iovec> =
            parts.iter_mut().map(|(_, b)| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        let remote: Vec<libc::iovec> = parts
            .iter()
            .map(|(addr, b)| libc::iovec { iov_base: *addr as *mut libc::c_void, iov_len: b.len() })
            .collect();
        if local.len() > 1024 {
            return false; // IOV_MAX
        }
        // SAFETY: every local iovec points into a live, exclusively borrowed buffer.
        let n = unsafe {
            libc::process_vm_readv(
                self.pid as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        n >= 0 && n as usize == total
    }

    /// The pointer in field `off` of the struct at `base`.
    pub fn ptr(&self, base: u64, off: u16) -> Result<u64, ProcessError> {
        if off == detector_common::NO_OFFSET {
            return Err(ProcessError::BadAddress { pid: self.pid, addr: base });
        }
        let addr = base.checked_add(off as u64).ok_or(ProcessError::BadAddress { pid: self.pid, addr: base })?;
        self.u64(addr)
    }

    /// A NUL-terminated C string at `addr`, at most `max` bytes.
    pub fn c_string(&self, addr: u64, max: usize) -> Result<String, ProcessError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < max {
            // A chunk may cross into an unmapped page; fall back to bytes.
            let n = match self.read(addr.saturating_add(out.len() as u64), &mut chunk) {
                Ok(()) => chunk.len(),
                Err(_) => {
                    self.read(addr.saturating_add(out.len() as u64), &mut chunk[..1])?;
                    1
                }
            };
            if let Some(end) = chunk[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_parts_are_read_in_one_call_and_a_bad_one_fails_it() {
        let data: Vec<u8> = (0..64).collect();
        let mem = ProcessMemory::open(std::process::id()).unwrap();
        let (mut a, mut b) = ([0u8; 4], [0u8; 8]);
        let base = data.as_ptr() as u64;
        assert!(mem.read_many(&mut [(base + 2, &mut a), (base + 40, &mut b)]));
        assert_eq!((a, b), ([2, 3, 4, 5], [40, 41, 42, 43, 44, 45, 46, 47]));
        assert!(!mem.read_many(&mut [(base, &mut a), (8, &mut b)]));
    }
}
