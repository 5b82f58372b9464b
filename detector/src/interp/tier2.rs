//! The tier-2 optimizer (`--enable-experimental-jit`, 3.13+): whether a
//! build carries it, where each interpreter says it is on, and the site
//! where it starts. Code it compiles runs a hot function's body start
//! without the interpreter's RESUME handlers and without reading the
//! bytecode the watchpoints watch, so a process running it cannot be
//! counted: refused when it is on at the attach, and no longer counted from
//! the moment it starts after (its entry is probed).

use super::{
    AnalysisError, UsedSymbol, dwarf,
    elf::ElfImage,
    offsets::OffsetSource,
    sites::{self, Site, SiteRole},
};

/// The optimizer's entry: every trace it compiles is compiled from here,
/// in 3.13 to 3.15 (`Py_NO_INLINE` since 3.14).
const ENTRY: &str = "_PyOptimizer_Optimize";

/// From 3.14 only the JIT's own `JUMP_BACKWARD_JIT` calls the entry; 3.13's
/// `JUMP_BACKWARD` calls it in every such build, the JIT off included.
const ENTRY_MEANS_ON: u8 = 14;

/// The tier-2 optimizer a build carries.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tier2 {
    /// `offsetof(PyInterpreterState, jit)` (3.14+), where it is known.
    pub jit_flag: Option<FieldAt>,
    /// Whether a JIT that starts after the attach is seen.
    pub start: StartSeen,
}

/// Whether a JIT that starts after the attach is seen.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum StartSeen {
    /// Its entry is probed. Called from `calls` places in the code: none
    /// means it was inlined, and the probe would not fire.
    Probed {
        /// Direct calls and jumps to it.
        calls: usize,
    },
    /// 3.13: its entry runs with the JIT off too, so it is not probed; a
    /// process is judged at the attach only.
    NotProbed,
}

/// A field too far into its struct for the offset tables (`u16`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FieldAt {
    /// Bytes from the struct's start.
    pub offset: u64,
    /// Where it came from.
    pub source: OffsetSource,
}

/// The tier-2 optimizer, if the build has one (its entry point is
/// exported), and its entry's site where that means the JIT is on. Where each interpreter says whether it
/// is on: DWARF, else the offset in the builds it was measured on,
/// recognised by `sizeof(PyInterpreterState)` from `_Py_DebugOffsets` (a
/// struct this large moves with the build's configuration).
pub(super) fn find(
    elf: &ElfImage,
    dwarf: Option<&dwarf::DwarfInfo>,
    (minor, interp_size): (u8, Option<u64>),
    symbols: &mut Vec<UsedSymbol>,
    warnings: &mut Vec<String>,
) -> Result<Option<(Tier2, Option<Site>)>, AnalysisError> {
    let Some(s) = elf.symbol(ENTRY) else { return Ok(None) };
    symbols.push(UsedSymbol { name: ENTRY, addr: s.addr, source: s.table });
    let jit_flag = jit_flag(dwarf, (minor, interp_size), warnings);
    if minor < ENTRY_MEANS_ON {
        warnings.push(format!(
            "CPython 3.{minor} enters its tier-2 optimizer with the JIT off too: a process whose JIT \
             starts after the attach is not seen (one is refused when PYTHON_JIT asks for it)"
        ));
        return Ok(Some((Tier2 { jit_flag, start: StartSeen::NotProbed }, None)));
    }
    let site = sites::function_entry(elf, ENTRY, s.addr, SiteRole::Tier2Start)?;
    let calls = calls_to(elf, s.addr);
    if calls == 0 {
        warnings.push(format!(
            "no call to the tier-2 optimizer's entry {ENTRY} was found (inlined, or called through the \
             PLT): a process whose JIT starts after the attach may be counted short without notice"
        ));
    }
    Ok(Some((Tier2 { jit_flag, start: StartSeen::Probed { calls } }, Some(site))))
}

fn jit_flag(
    dwarf: Option<&dwarf::DwarfInfo>,
    (minor, interp_size): (u8, Option<u64>),
    warnings: &mut Vec<String>,
) -> Option<FieldAt> {
    if let Some(offset) = dwarf.and_then(|d| d.offset_of("PyInterpreterState", "jit")) {
        return Some(FieldAt { offset, source: OffsetSource::Dwarf });
    }
    // (offsetof(PyInterpreterState, jit), sizeof(PyInterpreterState)) in
    // Debian's 3.14.10 and 3.15.2.
    let measured = match minor {
        14 => Some((223_184, 225_864)),
        15 => Some((223_408, 226_240)),
        _ => None,
    };
    match measured {
        Some((offset, size)) if interp_size == Some(size) => Some(FieldAt { offset, source: OffsetSource::Builtin }),
        Some(_) => {
            warnings.push(
                "the tier-2 optimizer is built in, and where its interpreters say it is on is not known for this \
                 build: a process is refused at the attach only if PYTHON_JIT asks for it"
                    .into(),
            );
            None
        }
        None => None,
    }
}

/// Direct calls and jumps (`call`/`jmp rel32`) to `target` in the code
/// sections.
fn calls_to(elf: &ElfImage, target: u64) -> usize {
    let code = elf.sections.iter().filter(|s| s.code);
    code.filter_map(|s| Some(calls_in(s.addr, elf.bytes_at(s.addr, s.size as usize)?, target))).sum()
}

/// Direct calls and jumps to `target` in `bytes`, loaded at `base`. Read
/// as bytes, not decoded: a false match needs the four bytes after an
/// opcode byte to equal the target's displacement, and it would only hide
/// the warning for a build that inlined the entry everywhere.
fn calls_in(base: u64, bytes: &[u8], target: u64) -> usize {
    let reaches = |(i, w): (usize, &[u8])| {
        let rel = i32::from_le_bytes([w[1], w[2], w[3], w[4]]);
        matches!(w[0], 0xe8 | 0xe9) && base.wrapping_add(i as u64 + 5).wrapping_add_signed(i64::from(rel)) == target
    };
    bytes.windows(5).enumerate().filter(|&x| reaches(x)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_displacement_counts_from_the_next_instruction() {
        // call +0 at 0x1000 reaches 0x1005; jmp -10 at 0x1005 reaches 0x1000.
        let code = [0xe8, 0, 0, 0, 0, 0xe9, 0xf6, 0xff, 0xff, 0xff];
        assert_eq!(calls_in(0x1000, &code, 0x1005), 1);
        assert_eq!(calls_in(0x1000, &code, 0x1000), 1);
        assert_eq!(calls_in(0x1000, &code, 0x1006), 0);
        assert_eq!(calls_in(0x1000, &code[..4], 0x1005), 0, "cut short");
    }
}
