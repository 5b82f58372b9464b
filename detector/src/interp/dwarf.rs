//! DWARF, through gimli: struct member offsets and sizes, and the
//! `TARGET_<OPCODE>` labels of the evaluation loop, from the interpreter
//! object itself or from its separate debug file (found by build id, or by
//! `.gnu_debuglink`, under the process's own root so container images work).

use std::{
    borrow::Cow,
    collections::HashMap,
    path::{Path, PathBuf},
};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, SectionId, Unit, UnitOffset};
use object::{Object, ObjectSection};

use super::{AnalysisError, elf::ElfImage};

/// Where the DWARF came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum DebugSource {
    /// The object's own `.debug_info`.
    Embedded,
    /// `/usr/lib/debug/.build-id/xx/rest.debug`.
    BuildId(String),
    /// A file named by `.gnu_debuglink`.
    DebugLink(String),
}

#[derive(Debug)]
enum TypeDef {
    Struct {
        size: u64,
        members: Vec<Member>,
    },
    /// typedef, const, volatile: the type it stands for.
    Alias(u64),
    /// `struct name;` without a body here: defined in another unit.
    Declaration(String),
}

#[derive(Debug)]
struct Member {
    name: String,
    offset: u64,
    ty: Option<u64>,
}

/// The parts of DWARF the analysis uses.
#[derive(Debug, Default)]
pub struct DwarfInfo {
    types: HashMap<u64, TypeDef>,
    names: HashMap<String, u64>,
    /// `TARGET_*` label addresses, by label name: every concrete instance
    /// (a function the compiler cloned has one per clone).
    pub labels: HashMap<String, Vec<u64>>,
    /// Named label DIEs, for concrete instances that only refer to them.
    label_names: HashMap<u64, String>,
    /// Concrete instances: (abstract origin, address).
    label_instances: Vec<(u64, u64)>,
    /// Whether clang compiled the evaluation loop (`ceval.c`'s unit), if
    /// that unit is here.
    pub ceval_by_clang: Option<bool>,
}

type Reader<'a> = EndianSlice<'a, RunTimeEndian>;

impl DwarfInfo {
    /// Parses the DWARF in `data` (an ELF object); `None` if it has none.
    pub fn parse(data: &[u8]) -> Result<Option<Self>, AnalysisError> {
        let file = object::File::parse(data).map_err(|e| AnalysisError::NotElf(e.to_string()))?;
        let has_info = file.section_by_name(".debug_info").is_some_and(|s| s.size() > 0 && s.file_range().is_some());
        if !has_info {
            return Ok(None);
        }
        let endian = if file.is_little_endian() { RunTimeEndian::Little } else { RunTimeEndian::Big };
        let mut sections: HashMap<SectionId, Cow<'_, [u8]>> = HashMap::new();
        for id in [
            SectionId::DebugAbbrev,
            SectionId::DebugAddr,
            SectionId::DebugInfo,
            SectionId::DebugLine,
            SectionId::DebugLineStr,
            SectionId::DebugLoc,
            SectionId::DebugLocLists,
            SectionId::DebugRanges,
            SectionId::DebugRngLists,
            SectionId::DebugStr,
            SectionId::DebugStrOffsets,
            SectionId::DebugTypes,
        ] {
            if let Some(s) = file.section_by_name(id.name()) {
                let what = |e: object::Error| bad(format!("{}: {e}", id.name()));
                // A compressed section declares the size it expands to:
                // bounded before anything is allocated for it.
                let compressed = s.compressed_data().map_err(what)?;
                if compressed.uncompressed_size > super::file::MAX_FILE {
                    let size = compressed.uncompressed_size;
                    return Err(bad(format!("{}: declares {size} bytes uncompressed", id.name())));
                }
                sections.insert(id, compressed.decompress().map_err(what)?);
            }
        }
        let dwarf = gimli::Dwarf::load(|id| -> Result<Reader<'_>, gimli::Error> {
            Ok(EndianSlice::new(sections.get(&id).map(|c| &c[..]).unwrap_or(&[]), endian))
        })
        .map_err(|e| bad(e.to_string()))?;
        let mut info = DwarfInfo::default();
        let mut units = dwarf.units();
        while let Some(header) = units.next().map_err(|e| bad(e.to_string()))? {
            let unit = dwarf.unit(header).map_err(|e| bad(e.to_string()))?;
            info.read_unit(&dwarf, &unit).map_err(|e| bad(e.to_string()))?;
        }
        for (origin, addr) in std::mem::take(&mut info.label_instances) {
            if let Some(name) = info.label_names.get(&origin) {
                info.labels.entry(name.clone()).or_default().push(addr);
            }
        }
        for addrs in info.labels.values_mut() {
            addrs.sort_unstable();
            addrs.dedup();
        }
        Ok(Some(info))
    }

    fn read_unit(&mut self, dwarf: &gimli::Dwarf<Reader<'_>>, unit: &Unit<Reader<'_>>) -> gimli::Result<()> {
        let global = |o: UnitOffset| o.to_debug_info_offset(&unit.header).map(|g| g.0 as u64);
        let type_ref = |v: Option<AttributeValue<Reader<'_>>>| match v {
            Some(AttributeValue::UnitRef(o)) => global(o),
            Some(AttributeValue::DebugInfoRef(o)) => Some(o.0 as u64),
            _ => None,
        };
        // The structs being filled, with the depth of their DIE.
        let mut open: Vec<(isize, u64)> = Vec::new();
        let mut cursor = unit.entries();
        while let Some(entry) = cursor.next_dfs()? {
            let depth = entry.depth();
            while open.last().is_some_and(|(d, _)| *d >= depth) {
                open.pop();
            }
            let Some(offset) = global(entry.offset()) else { continue };
            let name = match entry.attr_value(gimli::DW_AT_name) {
                Some(v) => Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned()),
                None => None,
            };
            match entry.tag() {
                gimli::DW_TAG_compile_unit if name.as_deref().is_some_and(|n| n.ends_with("ceval.c")) => {
                    self.ceval_by_clang = producer(dwarf, unit, entry)?.map(|p| p.contains("clang"));
                }
                gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type => {
                    if entry.attr_value(gimli::DW_AT_declaration).is_some() {
                        if let Some(n) = name {
                            self.types.insert(offset, TypeDef::Declaration(n));
                        }
                        continue;
                    }
                    let size = entry.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()).unwrap_or(0);
                    self.types.insert(offset, TypeDef::Struct { size, members: Vec::new() });
                    if let Some(n) = name {
                        self.names.entry(n).or_insert(offset);
                    }
                    open.push((depth, offset));
                }
                gimli::DW_TAG_member => {
                    let Some(&(parent_depth, parent)) = open.last() else { continue };
                    if parent_depth + 1 != depth {
                        continue;
                    }
                    let Some(off) = member_offset(entry.attr_value(gimli::DW_AT_data_member_location)) else {
                        continue; // bitfields carry their own attributes; not needed
                    };
                    let member = Member {
                        name: name.unwrap_or_default(),
                        offset: off,
                        ty: type_ref(entry.attr_value(gimli::DW_AT_type)),
                    };
                    if let Some(TypeDef::Struct { members, .. }) = self.types.get_mut(&parent) {
                        members.push(member);
                    }
                }
                gimli::DW_TAG_typedef | gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type => {
                    if let Some(target) = type_ref(entry.attr_value(gimli::DW_AT_type)) {
                        self.types.insert(offset, TypeDef::Alias(target));
                        if let (gimli::DW_TAG_typedef, Some(n)) = (entry.tag(), name) {
                            self.names.entry(n).or_insert(offset);
                        }
                    }
                }
                gimli::DW_TAG_label => {
                    let addr = match entry.attr_value(gimli::DW_AT_low_pc) {
                        Some(v) => dwarf.attr_address(unit, v)?,
                        None => None,
                    };
                    match (name.filter(|n| n.starts_with("TARGET_")), addr) {
                        (Some(n), Some(addr)) => self.labels.entry(n).or_default().push(addr),
                        (Some(n), None) => {
                            self.label_names.insert(offset, n);
                        }
                        (None, Some(addr)) => {
                            if let Some(origin) = type_ref(entry.attr_value(gimli::DW_AT_abstract_origin)) {
                                self.label_instances.push((origin, addr));
                            }
                        }
                        (None, None) => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The struct an offset's type stands for, through typedefs, qualifiers
    /// and declarations (resolved by name to a definition in another unit).
    fn resolve(&self, mut ty: u64) -> Option<(u64, &Vec<Member>)> {
        for _ in 0..16 {
            match self.types.get(&ty)? {
                TypeDef::Alias(t) => ty = *t,
                TypeDef::Struct { size, members } => return Some((*size, members)),
                TypeDef::Declaration(name) => ty = *self.names.get(name)?,
            }
        }
        None
    }

    /// `offsetof(type_name, path)` where `path` is dotted through nested
    /// structs (`interpreters.head`).
    pub fn offset_of(&self, type_name: &str, path: &str) -> Option<u64> {
        let mut ty = *self.names.get(type_name)?;
        let mut total = 0;
        for part in path.split('.') {
            let (_, members) = self.resolve(ty)?;
            let m = members.iter().find(|m| m.name == part)?;
            total += m.offset;
            ty = m.ty.unwrap_or(u64::MAX);
        }
        Some(total)
    }

    /// `sizeof(type_name)`.
    pub fn size_of(&self, type_name: &str) -> Option<u64> {
        self.resolve(*self.names.get(type_name)?).map(|(size, _)| size)
    }
}

/// A unit's `DW_AT_producer`: the compiler and its flags.
fn producer(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &Unit<Reader<'_>>,
    entry: &gimli::DebuggingInformationEntry<Reader<'_>>,
) -> gimli::Result<Option<String>> {
    let Some(v) = entry.attr_value(gimli::DW_AT_producer) else { return Ok(None) };
    Ok(Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned()))
}

fn member_offset(v: Option<AttributeValue<Reader<'_>>>) -> Option<u64> {
    match v? {
        AttributeValue::Exprloc(expr) => {
            // Old compilers: DW_OP_plus_uconst N.
            let b = expr.0.slice();
            (b.first() == Some(&0x23)).then(|| leb128(&b[1..])).flatten()
        }
        other => other.udata_value(),
    }
}

fn leb128(b: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Whether a `.gnu_debuglink` name is a plain file name, as the format
/// has it: a name with a `/` (or `.`, `..`) would lead elsewhere.
fn is_file_name(link: &str) -> bool {
    !link.is_empty() && !link.contains('/') && link != "." && link != ".."
}

fn bad(msg: String) -> AnalysisError {
    AnalysisError::Unsupported(format!("malformed DWARF: {msg}"))
}

/// Finds DWARF for `elf`: its own, else a separate debug file by build id or
/// `.gnu_debuglink`. `object` is its path as the process sees it and `root`
/// the process's root directory (`/proc/PID/root`, or `/`). Debug files are
/// read inside a root only (see [`super::file`]); a debuglink that is not a
/// plain file name, and a debug file whose build id differs from the
/// object's, are ignored.
pub fn find(elf: &ElfImage, object: &str, root: &Path) -> Result<Option<(DwarfInfo, DebugSource)>, AnalysisError> {
    if let Some(info) = DwarfInfo::parse(elf.data())? {
        return Ok(Some((info, DebugSource::Embedded)));
    }
    // Paths in /proc/PID/maps are relative to the process's root in another
    // mount namespace, but to ours for a chroot: try both roots.
    let roots: Vec<&Path> = if root == Path::new("/") { vec![root] } else { vec![root, Path::new("/")] };
    let mut candidates: Vec<(&Path, PathBuf, DebugSource)> = Vec::new();
    for base in roots {
        if let Some(id) = &elf.build_id
            && id.len() >= 2
        {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let rel = format!("usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..]);
            candidates.push((base, PathBuf::from(&rel), DebugSource::BuildId(format!("/{rel}"))));
        }
        if let Some(link) = elf.debuglink.as_ref().filter(|l| is_file_name(l)) {
            let dir = Path::new(object).parent().unwrap_or(Path::new("/"));
            let rel_dir = dir.strip_prefix("/").unwrap_or(dir);
            for p in [
                rel_dir.join(link),
                rel_dir.join(".debug").join(link),
                Path::new("usr/lib/debug").join(rel_dir).join(link),
            ] {
                let source = DebugSource::DebugLink(format!("/{}", p.display()));
                candidates.push((base, p, source));
            }
        }
    }
    for (base, path, source) in candidates {
        let Ok(data) = super::file::read_in_root(base, &path) else { continue };
        let Ok(debug) = ElfImage::parse(data) else { continue };
        if elf.build_id.is_some() && debug.build_id.is_some() && debug.build_id != elf.build_id {
            continue;
        }
        if let Some(info) = DwarfInfo::parse(debug.data())? {
            return Ok(Some((info, source)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_test_binary() {
        // The release profile's limited debug info (line tables, no types):
        // parsed whole without an error. What CPython's DWARF gives is
        // checked against the built-in tables on every interpreter with
        // symbols by the integration tests.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(DwarfInfo::parse(&exe).unwrap().is_some(), "test binaries carry DWARF");
    }

    #[test]
    fn debuglinks_are_plain_file_names() {
        assert!(is_file_name("libpython3.12.so.1.0.debug"));
        for bad in ["", ".", "..", "/dev/zero", "../../etc/shadow", "a/b"] {
            assert!(!is_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn leb128_values() {
        assert_eq!(leb128(&[0x38]), Some(0x38));
        assert_eq!(leb128(&[0x80, 0x01]), Some(128));
        assert_eq!(leb128(&[0x80]), None);
    }
}
