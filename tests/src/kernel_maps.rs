//! The eBPF maps an agent holds, read from outside through the kernel's own
//! interface (map ids from the agent's fdinfo, then `bpf(2)`), so a test can
//! see exactly which keys the agent left behind.

use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd, OwnedFd},
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The leading fields of the kernel's `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    kind: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 4]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

/// Every key of every map `agent` holds open, by map name (the kernel's
/// 15-character prefix of it).
pub fn keys_by_map(agent: u32) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out = BTreeMap::new();
    for id in map_ids(agent) {
        let mut attr = [id as u64, 0, 0, 0];
        let Ok(fd) = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr) else { continue };
        // SAFETY: a descriptor the kernel just returned, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
        let mut info = MapInfo::default();
        let mut attr = [raw | ((size_of::<MapInfo>() as u64) << 32), &raw mut info as u64, 0, 0];
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("map info");
        let name = String::from_utf8_lossy(info.name.split(|&b| b == 0).next().unwrap()).into_owned();
        out.insert(name, keys(raw, info.key_size as usize));
    }
    out
}

/// The ids of the maps `pid` holds a descriptor of.
fn map_ids(pid: u32) -> Vec<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("agent's fdinfo");
    let mut ids: Vec<u32> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn keys(fd: u64, size: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut next = vec![0u8; size];
    let mut cur: Option<Vec<u8>> = None;
    // Array maps' keys are indices: only hash maps are of interest, and a
    // bound keeps a map that changes meanwhile from looping.
    for _ in 0..1 << 20 {
        let key_ptr = cur.as_ref().map_or(0, |k| k.as_ptr() as u64);
        let mut attr = [fd, key_ptr, next.as_mut_ptr() as u64, 0];
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            break;
        }
        out.push(next.clone());
        cur = Some(next.clone());
    }
    out
}

/// The keys of `map` whose leading 32 bits (the process, in every
/// per-process key of the detector) are `pid`.
pub fn keys_of(maps: &BTreeMap<String, Vec<Vec<u8>>>, map: &str, pid: u32) -> usize {
    let keys = maps.get(map).unwrap_or_else(|| panic!("the agent holds map {map}"));
    keys.iter().filter(|k| k.len() >= 4 && k[..4] == pid.to_ne_bytes()).count()
}
