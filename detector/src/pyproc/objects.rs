//! Python objects read from outside: strings, tuples, dicts and types.
//!
//! Every loop is bounded; any malformed or concurrently mutated object gives
//! an error, never a hang.

use detector_common::unicode_state;

use super::{ProcessError, mem::ProcessMemory};
use crate::interp::offsets::Offsets;

/// Longest string read, in characters.
const MAX_STR: i64 = 4096;
/// Most dict entries or tuple items read.
const MAX_ITEMS: i64 = 1 << 20;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: set on the type of every class (a metaclass).
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;

/// A typed view of one process's objects.
pub struct Objects<'a> {
    /// The process's memory.
    pub mem: &'a ProcessMemory,
    /// Offsets for its interpreter.
    pub o: &'a Offsets,
    /// Its minor version.
    pub minor: u8,
    /// How far up its build moves the bits of a `str`'s `state`.
    state_shift: u8,
    /// Type names already read, by type: a walk asks the same few types
    /// again and again (every constant of a module is checked for `code`).
    type_names: std::cell::RefCell<std::collections::HashMap<u64, String>>,
}

impl<'a> Objects<'a> {
    /// The view of `process`'s objects through `mem`.
    pub fn of(process: &'a super::PythonProcess, mem: &'a ProcessMemory) -> Self {
        let a = &process.analysis;
        let (o, minor, state_shift) = (&a.table.values, a.version.minor, a.layout.unicode_state_shift);
        Objects { mem, o, minor, state_shift, type_names: Default::default() }
    }

    fn bad(&self, addr: u64) -> ProcessError {
        ProcessError::BadAddress { pid: self.mem.pid(), addr }
    }

    /// `base + off`, for a `base` read from the process: past the address
    /// space is a bad address, not a wrapped one.
    fn at(&self, base: u64, off: impl Into<u64>) -> Result<u64, ProcessError> {
        base.checked_add(off.into()).ok_or_else(|| self.bad(base))
    }

    /// A `str` object's value (compact strings of any kind).
    pub fn str(&self, obj: u64) -> Result<String, ProcessError> {
        let state = self.mem.u32(self.at(obj, self.o.unicode_state)?)? >> self.state_shift;
        let len = self.mem.i64(self.at(obj, self.o.unicode_length)?)?;
        let kind = (state >> unicode_state::KIND_SHIFT) & unicode_state::KIND_MASK;
        let (compact, ascii) = (state & unicode_state::COMPACT != 0, state & unicode_state::ASCII != 0);
        if !compact || !(0..=MAX_STR).contains(&len) {
            return Err(self.bad(obj));
        }
        let data = self.at(obj, if ascii { self.o.unicode_ascii_data } else { self.o.unicode_compact_data })?;
        let len = len as usize;
        match kind {
            1 => Ok(self.mem.bytes(data, len)?.into_iter().map(char::from).collect()),
            2 => {
                let b = self.mem.bytes(data, len * 2)?;
                let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                Ok(String::from_utf16_lossy(&units))
            }
            4 => {
                let b = self.mem.bytes(data, len * 4)?;
                Ok(b.chunks_exact(4)
                    .map(|c| char::from_u32(u32::from_le_bytes(c.try_into().unwrap())).unwrap_or('\u{fffd}'))
                    .collect())
            }
            _ => Err(self.bad(obj)),
        }
    }

    /// The object's type.
    pub fn type_of(&self, obj: u64) -> Result<u64, ProcessError> {
        self.mem.ptr(obj, self.o.object_type)
    }

    /// `type(obj).__name__` as the C struct spells it (`tp_name`).
    pub fn type_name(&self, obj: u64) -> Result<String, ProcessError> {
        let ty = self.type_of(obj)?;
        if let Some(name) = self.type_names.borrow().get(&ty) {
            return Ok(name.clone());
        }
        let name = self.mem.c_string(self.mem.ptr(ty, self.o.type_name)?, 256)?;
        // A walk meets a handful of types; a hostile one cannot grow this.
        let mut names = self.type_names.borrow_mut();
        if names.len() < 256 {
            names.insert(ty, name.clone());
        }
        Ok(name)
    }

    /// Whether `obj` is a class (its type is a subclass of `type`).
    pub fn is_class(&self, obj: u64) -> bool {
        self.type_of(obj)
            .and_then(|t| self.mem.u64(self.at(t, self.o.type_flags)?))
            .is_ok_and(|flags| flags & TPFLAGS_TYPE_SUBCLASS != 0)
    }

    /// A class's `__dict__`.
    pub fn class_dict(&self, class: u64) -> Result<u64, ProcessError> {
        self.mem.ptr(class, self.o.type_dict)
    }

    /// A tuple's items.
    pub fn tuple_items(&self, tuple: u64) -> Result<Vec<u64>, ProcessError> {
        let n = self.mem.i64(self.at(tuple, self.o.tuple_size)?)?;
        if !(0..=MAX_ITEMS).contains(&n) {
            return Err(self.bad(tuple));
        }
        let raw = self.mem.bytes(self.at(tuple, self.o.tuple_items)?, n as usize * 8)?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    /// A list's items, at most `max` (a list is the process's to grow).
    pub fn list_items(&self, list: u64, max: usize) -> Result<Vec<u64>, ProcessError> {
        // `PyListObject`: the variable-size header (`ob_size` where a
        // tuple's is), then `ob_item`, a pointer to the items.
        let n = self.mem.i64(self.at(list, self.o.tuple_size)?)?;
        if !(0..=MAX_ITEMS).contains(&n) {
            return Err(self.bad(list));
        }
        let items = self.mem.ptr(list, self.o.tuple_size + 8)?;
        let n = (n as usize).min(max);
        if n == 0 {
            return Ok(Vec::new());
        }
        let raw = self.mem.bytes(items, n * 8)?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    /// A dict's live (key, value) pairs, in insertion order. Split tables
    /// (instance dicts) are not needed and not supported.
    pub fn dict_items(&self, dict: u64) -> Result<Vec<(u64, u64)>, ProcessError> {
        let keys = self.mem.ptr(dict, self.o.dict_keys)?;
        let values = self.mem.ptr(dict, self.o.dict_values)?;
        if values != 0 {
            return Err(self.bad(dict));
        }
        let (nentries, entries, stride, key_at) = if self.minor <= 10 {
            // dk_refcnt, dk_size, dk_lookup, dk_usable, dk_nentries, dk_indices[]
            let size = self.mem.i64(self.at(keys, self.o.dictkeys_size)?)?;
            let nentries = self.mem.i64(self.at(keys, u64::from(self.o.dictkeys_indices).saturating_sub(8))?)?;
            let ix = match size {
                ..=0xff => 1,
                0x100..=0xffff => 2,
                0x1_0000..=0xffff_ffff => 4,
                _ => 8,
            };
            let indices = (size as u64).checked_mul(ix).ok_or_else(|| self.bad(keys))?;
            (nentries, self.at(self.at(keys, self.o.dictkeys_indices)?, indices)?, 24u64, 8u64)
        } else {
            // dk_refcnt, dk_log2_size, dk_log2_index_bytes, dk_kind, .., dk_nentries, dk_indices[]
            let log2_index_bytes = self.mem.u8(self.at(keys, 9u64)?)? as u32;
            let kind = self.mem.u8(self.at(keys, 10u64)?)?;
            let nentries = self.mem.i64(self.at(keys, 24u64)?)?;
            if log2_index_bytes > 40 {
                return Err(self.bad(keys));
            }
            let entries = self.at(keys, 32 + (1u64 << log2_index_bytes))?;
            // General keys hold (hash, key, value); unicode keys (key, value).
            if kind == 0 { (nentries, entries, 24, 8) } else { (nentries, entries, 16, 0) }
        };
        if !(0..=MAX_ITEMS).contains(&nentries) {
            return Err(self.bad(keys));
        }
        let raw = self.mem.bytes(entries, (nentries as u64 * stride) as usize)?;
        Ok(raw
            .chunks_exact(stride as usize)
            .filter_map(|e| {
                let k = u64::from_le_bytes(e[key_at as usize..key_at as usize + 8].try_into().unwrap());
                let v = u64::from_le_bytes(e[key_at as usize + 8..key_at as usize + 16].try_into().unwrap());
                (k != 0 && v != 0).then_some((k, v))
            })
            .collect())
    }

    /// `dict[key]` for a `str` key.
    pub fn dict_get(&self, dict: u64, key: &str) -> Result<Option<u64>, ProcessError> {
        Ok(self.dict_get_many(dict, &[key])?.into_values().next())
    }

    /// `dict[key]` for each of `keys` it has, in one pass over the dict: a
    /// key's length is read first, and its characters only if it matches
    /// one of `keys` in length (most do not: one read per entry).
    pub fn dict_get_many<'k>(
        &self,
        dict: u64,
        keys: &[&'k str],
    ) -> Result<std::collections::BTreeMap<&'k str, u64>, ProcessError> {
        let mut found = std::collections::BTreeMap::new();
        for (k, v) in self.dict_items(dict)? {
            // Keys that are not strings (or unreadable) simply do not match.
            let Ok(len) = self.at(k, self.o.unicode_length).and_then(|a| self.mem.i64(a)) else { continue };
            if !keys.iter().any(|key| key.len() as i64 == len) {
                continue;
            }
            if let Ok(s) = self.str(k)
                && let Some(key) = keys.iter().find(|key| **key == s)
            {
                found.insert(*key, v);
                if found.len() == keys.len() {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// How many items a dict holds.
    pub fn dict_len(&self, dict: u64) -> Result<i64, ProcessError> {
        self.mem.i64(self.at(dict, self.o.dict_used)?)
    }
}
