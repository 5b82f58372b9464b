//! Counting hits and writing events. Counts live in maps and are exact; events
//! are best effort (a full ring buffer drops them and counts the drop).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user_str_bytes},
    maps::ring_buf::RingBufEntry,
};
use detector_common::{
    CandidateEvent, CodeEvent, CountKey, EVENT_CANDIDATE, EVENT_CODE, EVENT_HIT, EVENT_PENDING_FREED,
    EVENT_WATCH_FREED, EventHeader, FreedEvent, HitEvent, Layout, NO_SLOT, PendingEntry, PendingFreedEvent, PendingKey,
    SLOT_CELLS, stats, unicode_state,
};

use crate::{
    callers,
    maps::{
        CELLS, CONFIG, COUNTS, EVENTS, PENDING, atomic_add, bump, dropped, pending_made, pending_refused, pending_room,
        pending_unmade,
    },
    mem::{field, read},
};

/// Adds one to the counter `map[key]` (reached through `$counter`), creating
/// the entry as `$new` (which counts one) if needed. Evaluates to the count
/// after it (read back: CPUs adding at once may both see the larger one), or
/// 0 if the map is full.
macro_rules! increment {
    ($map:expr, $key:expr, $new:expr, |$p:ident| $counter:expr) => {{
        let key = $key;
        match $map.get_ptr_mut(&key) {
            Some($p) => atomic_add($counter),
            None => match $map.insert(&key, &$new, BPF_NOEXIST as u64) {
                Ok(()) => 1,
                // Lost a race with another CPU creating it: add to theirs.
                Err(_) => match $map.get_ptr_mut(&key) {
                    Some($p) => atomic_add($counter),
                    None => {
                        bump(stats::MAP_FULL);
                        0
                    }
                },
            },
        }
    }};
}

/// Flags for submitting a record of `size` bytes: wake the reader only when
/// this record makes the waiting data cross the threshold. Below it the
/// reader's timer drains the buffer; above it the reader is already awake
/// (or the buffer is full and records drop, counted). A wakeup is an IPI,
/// which in a VM is a trip to the hypervisor: never one per record.
#[inline(always)]
pub fn submit_flags(size: u64) -> u64 {
    let threshold = CONFIG.get(0).map(|c| c.wakeup_bytes).unwrap_or(0) as u64;
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if waiting < threshold && waiting + size >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Space for one `T` in the ring buffer, or `None` with the drop counted
/// (for the process in `slot` too).
#[inline(always)]
pub fn reserve<T: 'static>(slot: u16) -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        dropped(slot);
    }
    entry
}

/// Counts a hit of `target` in `cell` of process `tgid`'s `slot` (or in
/// [`COUNTS`] if not a cell) and reports it: always, or if `sparse` only
/// when the count becomes a power of two (the record is most of what a hit
/// adds to a probe pass, and reachability needs only the first). A
/// cell's count is this CPU's share, so each CPU reports its own first hit.
/// A first hit also records who called it, from the target's frame and
/// layout that `frame` finds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn hit<'a>(
    slot: u16,
    tgid: u32,
    tid: u32,
    target: u32,
    cell: u32,
    code: u64,
    sparse: bool,
    frame: impl FnOnce() -> Option<(&'a Layout, u64)>,
) {
    let count = match CELLS.get_ptr_mut(slot as u32) {
        // Atomic although per-CPU: a program may be preempted on its CPU.
        Some(cells) if (cell as usize) < SLOT_CELLS => {
            // A mask the compiler cannot drop (it knows the bound; the
            // verifier, tracking another copy of the register, does not).
            let i = unsafe { core::ptr::read_volatile(&(cell as usize)) } & (SLOT_CELLS - 1);
            atomic_add(unsafe { &raw mut (*cells).hits[i] })
        }
        _ => increment!(COUNTS, CountKey { tgid, target }, 1u64, |p| p),
    };
    bump(stats::HITS);
    if count == 1
        && let Some((layout, f)) = frame()
    {
        callers::record(target, code, layout, f);
    }
    if sparse && count & count.wrapping_sub(1) != 0 {
        return;
    }
    let Some(mut entry) = reserve::<HitEvent>(slot) else { return };
    bump(stats::HIT_RECORDS);
    entry.write(HitEvent {
        header: EventHeader { kind: EVENT_HIT, tgid },
        tid,
        target,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        code,
    });
    entry.submit(submit_flags(size_of::<HitEvent>() as u64));
}

/// Reports where a newly matched code object comes from.
#[inline(always)]
pub fn code(layout: &Layout, tgid: u32, target: u32, code: u64) {
    let Some(mut entry) = reserve::<CodeEvent>(NO_SLOT) else { return };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).header = EventHeader { kind: EVENT_CODE, tgid };
        (*ev).target = target;
        (*ev).code = code;
        (*ev).firstlineno = read::<u32>(code + layout.code_firstlineno as u64).unwrap_or(0);
        (*ev).filename[0] = 0;
        // ASCII paths only; user space reads any other from the process.
        if let Some(name) = field(code, layout.code_filename)
            && let Some(state) = read::<u32>(name + layout.unicode_state as u64)
            && (state >> layout.unicode_state_shift) & unicode_state::ASCII != 0
            && (state >> layout.unicode_state_shift) & unicode_state::COMPACT != 0
        {
            let src = (name + layout.unicode_ascii_data as u64) as *const u8;
            if bpf_probe_read_user_str_bytes(src, &mut (*ev).filename).is_err() {
                (*ev).filename[0] = 0;
            }
        }
    }
    entry.submit(submit_flags(size_of::<CodeEvent>() as u64));
}

/// 3.8-3.10: counts a start of a code object awaiting resolution and asks
/// user space to resolve it.
#[inline(always)]
pub fn candidate(slot: u16, tgid: u32, tid: u32, generation: u32, code: u64, name: u64, globals: u64) {
    let key = PendingKey { tgid, generation, code };
    if unsafe { PENDING.get(&key) }.is_none() && !pending_room(slot) {
        pending_refused(slot);
        return;
    }
    let entry = PendingEntry { hits: 1, name, globals };
    let first = match increment!(PENDING, key, entry, |p| unsafe { &raw mut (*p).hits }) {
        // Not counted (the map is full): nor reported.
        0 => {
            pending_refused(slot);
            return;
        }
        1 => {
            pending_made(slot);
            true
        }
        _ => false,
    };
    let Some(mut entry) = reserve::<CandidateEvent>(slot) else { return };
    entry.write(CandidateEvent {
        header: EventHeader { kind: EVENT_CANDIDATE, tgid },
        tid,
        generation,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        code,
        name,
        globals,
    });
    // A code object's first start sets off its resolution: wake the reader
    // now (a short-lived process may not wait); later starts wait for it.
    let flags = if first { BPF_RB_FORCE_WAKEUP as u64 } else { submit_flags(size_of::<CandidateEvent>() as u64) };
    entry.submit(flags);
}

/// 3.8-3.10: the code object `code` of the process in `slot` is being
/// deallocated. Its starts counted while awaiting resolution are handed to
/// user space and its entry taken out, so a code object allocated at its
/// address next counts apart. Without room in the ring buffer the entry
/// stays (and the next object there would share it).
#[inline(always)]
pub fn pending_freed(slot: u16, tgid: u32, code: u64) {
    let Some(generation) = CONFIG.get(0).map(|c| c.generation) else { return };
    let key = PendingKey { tgid, generation, code };
    let Some(hits) = (unsafe { PENDING.get(&key) }).map(|e| e.hits) else { return };
    let Some(mut entry) = reserve::<PendingFreedEvent>(slot) else { return };
    entry.write(PendingFreedEvent {
        header: EventHeader { kind: EVENT_PENDING_FREED, tgid },
        generation,
        _pad: 0,
        code,
        hits,
    });
    // The object is being freed: nothing starts it again, nothing adds to
    // its entry any more.
    if PENDING.remove(&key).is_ok() {
        pending_unmade(slot);
    }
    entry.submit(submit_flags(size_of::<PendingFreedEvent>() as u64));
}

/// A watched code object is being deallocated.
#[inline(always)]
pub fn freed(slot: u16, tgid: u32, code: u64) {
    let Some(mut entry) = reserve::<FreedEvent>(slot) else { return };
    entry.write(FreedEvent { header: EventHeader { kind: EVENT_WATCH_FREED, tgid }, code });
    // Rare, and the target is unwatched until user space acts: wake it now.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
}
