//! The parts of an ELF object the analysis needs, extracted once into owned
//! tables: sections, loadable segments, symbols from `.dynsym` and `.symtab`,
//! and the `R_X86_64_RELATIVE` relocations that fill PIE pointer tables.

use std::{collections::HashMap, path::Path};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, RelocationFlags, SectionKind, SymbolKind, elf};

use super::AnalysisError;

/// Where a symbol's address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolTable {
    /// `.dynsym`: survives stripping.
    Dynsym,
    /// `.symtab`: gone from stripped binaries.
    Symtab,
}

/// A defined symbol.
#[derive(Clone, Copy, Debug)]
pub struct Symbol {
    /// Virtual address in the object.
    pub addr: u64,
    /// Size in bytes (0 if unknown).
    pub size: u64,
    /// Table it was found in.
    pub table: SymbolTable,
}

/// A section header.
#[derive(Clone, Debug)]
pub struct Section {
    /// Name, e.g. `.rodata`.
    pub name: String,
    /// Virtual address (0 if not allocated).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whether it holds executable code.
    pub code: bool,
}

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// Virtual address.
    pub vaddr: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes backed by the file.
    pub filesz: u64,
}

/// An ELF object read into memory.
pub struct ElfImage {
    data: Vec<u8>,
    /// `ET_DYN` (PIE executable or shared library) rather than `ET_EXEC`.
    pub position_independent: bool,
    /// GNU build id, if present.
    pub build_id: Option<Vec<u8>>,
    /// `.gnu_debuglink` file name, if present.
    pub debuglink: Option<String>,
    /// Section headers.
    pub sections: Vec<Section>,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    symbols: HashMap<String, Symbol>,
    local_prefixed: Vec<(String, Symbol)>,
    relative: HashMap<u64, u64>,
}

impl ElfImage {
    /// Reads and parses `path` (a regular file of bounded size, opened
    /// without blocking).
    pub fn open(path: &Path) -> Result<Self, AnalysisError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| AnalysisError::Io { path: path.to_owned(), source };
        let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
        Self::parse(super::file::read_capped(file).map_err(io)?)
    }

    /// Parses an object already in memory.
    pub fn parse(data: Vec<u8>) -> Result<Self, AnalysisError> {
        let file = object::File::parse(&*data).map_err(|e| AnalysisError::NotElf(e.to_string()))?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(AnalysisError::Unsupported(format!(
                "architecture {:?}: only x86_64 is supported",
                file.architecture()
            )));
        }
        let position_independent = match &file {
            object::File::Elf64(f) => f.elf_header().e_type.get(f.endian()) == elf::ET_DYN,
            _ => return Err(AnalysisError::NotElf("not a 64-bit ELF object".into())),
        };
        let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink =
            file.gnu_debuglink().ok().flatten().map(|(name, _crc)| String::from_utf8_lossy(name).into_owned());

        // Sizes as the header says them, bounded by the bytes the file has
        // (a section without any, such as `.bss`, by the file's size):
        // scans over a section never outrun the file.
        let file_len = data.len() as u64;
        let sections = file
            .sections()
            .map(|s| Section {
                name: s.name().unwrap_or("").to_owned(),
                addr: s.address(),
                size: match s.file_range() {
                    Some((offset, len)) => len.min(file_len.saturating_sub(offset)),
                    None => s.size().min(file_len),
                },
                code: s.kind() == SectionKind::Text,
            })
            .collect();
        let segments = file
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                Segment { vaddr: s.address(), offset, filesz }
            })
            .collect();

        let mut symbols = HashMap::new();
        let mut local_prefixed = Vec::new();
        for (iter, table) in [(file.dynamic_symbols(), SymbolTable::Dynsym), (file.symbols(), SymbolTable::Symtab)] {
            for sym in iter {
                if sym.is_undefined() || !matches!(sym.kind(), SymbolKind::Text | SymbolKind::Data) {
                    continue;
                }
                let Ok(name) = sym.name() else { continue };
                let entry = Symbol { addr: sym.address(), size: sym.size(), table };
                // Compilers suffix function-local statics (`opcode_targets.3`).
                if sym.is_local() && name.contains('.') {
                    local_prefixed.push((name.to_owned(), entry));
                }
                // Prefer .dynsym: it is what a stripped twin of this file has.
                symbols.entry(name.to_owned()).or_insert(entry);
            }
        }

        let mut relative = HashMap::new();
        if let Some(relocs) = file.dynamic_relocations() {
            for (offset, reloc) in relocs {
                if let RelocationFlags::Elf { r_type: elf::R_X86_64_RELATIVE } = reloc.flags() {
                    relative.insert(offset, reloc.addend() as u64);
                }
            }
        }

        Ok(ElfImage {
            data,
            position_independent,
            build_id,
            debuglink,
            sections,
            segments,
            symbols,
            local_prefixed,
            relative,
        })
    }

    /// The raw bytes of the file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// A defined symbol by exact name.
    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.symbols.get(name).copied()
    }

    /// Local symbols named `prefix.N` (function-local statics).
    pub fn local_symbols<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, Symbol)> {
        self.local_prefixed.iter().filter_map(move |(n, s)| {
            let rest = n.strip_prefix(prefix)?.strip_prefix('.')?;
            rest.bytes().all(|b| b.is_ascii_digit()).then_some((n.as_str(), *s))
        })
    }

    /// A section by name.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Whether `addr` lies in an executable section.
    pub fn is_code(&self, addr: u64) -> bool {
        self.sections.iter().any(|s| s.code && addr >= s.addr && addr < s.addr.saturating_add(s.size))
    }

    /// File offset of the byte at virtual address `addr`.
    pub fn file_offset(&self, addr: u64) -> Option<u64> {
        let inside = |s: &&Segment| addr >= s.vaddr && addr < s.vaddr.saturating_add(s.filesz);
        self.segments.iter().find(inside).and_then(|s| s.offset.checked_add(addr - s.vaddr))
    }

    /// `len` bytes at virtual address `addr`, as stored in the file.
    pub fn bytes_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(self.file_offset(addr)?).ok()?;
        self.data.get(off..off.checked_add(len)?)
    }

    /// A pointer stored at `addr` as the loader leaves it (before adding the
    /// load bias): the relocation addend where one applies.
    pub fn pointer_at(&self, addr: u64) -> Option<u64> {
        if let Some(&addend) = self.relative.get(&addr) {
            return Some(addend);
        }
        let b = self.bytes_at(addr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// Bytes of a section, by name.
    pub fn section_bytes(&self, name: &str) -> Option<(u64, &[u8])> {
        let s = self.section(name)?;
        Some((s.addr, self.bytes_at(s.addr, s.size as usize)?))
    }
}
