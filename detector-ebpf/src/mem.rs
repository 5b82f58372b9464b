//! Reading the watched process's memory: pointers, integers, and CPython
//! strings as the kernel compares them.

use aya_ebpf::helpers::{bpf_probe_read_user, bpf_probe_read_user_str_bytes};
use detector_common::{Layout, NAME_LEN, NO_OFFSET, stats, unicode_state};

use crate::maps::bump;

/// Reads a `T` at `addr`, counting failures.
#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    match unsafe { bpf_probe_read_user(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(stats::READ_ERRORS);
            None
        }
    }
}

/// Reads a pointer field at `base + off`.
#[inline(always)]
pub fn field(base: u64, off: u16) -> Option<u64> {
    if off == NO_OFFSET {
        return None;
    }
    read::<u64>(base + off as u64)
}

/// Reads an object pointer stored as a `_PyStackRef` on 3.14+ (tag bits set)
/// or a plain pointer before.
#[inline(always)]
pub fn object_field(layout: &Layout, base: u64, off: u16) -> Option<u64> {
    let v = field(base, off)?;
    if layout.flags & detector_common::LAYOUT_STACKREFS != 0 { Some(v & !7) } else { Some(v) }
}

/// Copies a compact ASCII `str` into `out` (which must be zeroed), returning
/// false if `obj` is not one or does not fit. Non-ASCII names never match:
/// targets are ASCII by validation.
#[inline(always)]
pub fn read_ascii(layout: &Layout, obj: u64, out: &mut [u8; NAME_LEN]) -> bool {
    if obj == 0 {
        return false;
    }
    let Some(state) = read::<u32>(obj + layout.unicode_state as u64) else {
        return false;
    };
    let want = (unicode_state::COMPACT | unicode_state::ASCII) << layout.unicode_state_shift;
    if state & want != want {
        return false;
    }
    let Some(len) = read::<i64>(obj + layout.unicode_length as u64) else {
        return false;
    };
    if len <= 0 || len >= NAME_LEN as i64 {
        return false;
    }
    let src = (obj + layout.unicode_ascii_data as u64) as *const u8;
    match unsafe { bpf_probe_read_user_str_bytes(src, out) } {
        // CPython keeps a NUL after every string, so the copy stops there; a
        // shorter copy means an embedded NUL, which no target has.
        Ok(bytes) => bytes.len() as i64 == len,
        Err(_) => false,
    }
}
