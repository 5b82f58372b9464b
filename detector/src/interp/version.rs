//! Which CPython an object holds, and what flavour of build it is.

use std::fmt;

use super::{AnalysisError, elf::ElfImage};

/// A CPython version, as in `PY_VERSION_HEX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    /// Major (3).
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Micro.
    pub micro: u8,
    /// Release level nibble: 0xA alpha, 0xB beta, 0xC candidate, 0xF final.
    pub level: u8,
    /// Serial within the level.
    pub serial: u8,
}

impl PyVersion {
    /// Decodes `PY_VERSION_HEX`.
    pub fn from_hex(hex: u32) -> Self {
        PyVersion {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
            level: ((hex >> 4) & 0xf) as u8,
            serial: (hex & 0xf) as u8,
        }
    }

    /// Parses `3.X.Y` with an optional `aN`/`bN`/`rcN` suffix and `+`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_suffix('+').unwrap_or(s);
        let mut parts = s.splitn(3, '.');
        let major: u8 = parts.next()?.parse().ok()?;
        let minor: u8 = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let micro: u8 = rest[..digits].parse().ok()?;
        let suffix = &rest[digits..];
        let (level, serial) = if suffix.is_empty() {
            (0xf, 0)
        } else {
            let (level, n) = if let Some(n) = suffix.strip_prefix("rc") {
                (0xc, n)
            } else if let Some(n) = suffix.strip_prefix('a') {
                (0xa, n)
            } else if let Some(n) = suffix.strip_prefix('b') {
                (0xb, n)
            } else {
                return None;
            };
            (level, n.parse().ok()?)
        };
        (major == 3).then_some(PyVersion { major, minor, micro, level, serial })
    }
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        match self.level {
            0xa => write!(f, "a{}", self.serial),
            0xb => write!(f, "b{}", self.serial),
            0xc => write!(f, "rc{}", self.serial),
            _ => Ok(()),
        }
    }
}

impl serde::Serialize for PyVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How the interpreter was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavour {
    /// An ordinary release build.
    Release,
    /// `--with-pydebug`: layouts and code of their own, analysed from DWARF.
    Debug,
    /// `--disable-gil` (`3.13t`): different object layouts and no GIL.
    FreeThreaded,
}

/// Where the version was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionSource {
    /// `_Py_DebugOffsets.version` at the start of `_PyRuntime` (3.13+).
    DebugOffsets,
    /// The exported `Py_Version` constant (3.11+).
    PyVersionSymbol,
    /// The `PY_VERSION` string in read-only data.
    VersionString,
}

/// Detects the version of the interpreter in `elf`. `hint` is the file name,
/// used to pick among several version-like strings.
pub fn detect(
    elf: &ElfImage,
    debug_offsets_version: Option<u32>,
    hint: &str,
) -> Result<(PyVersion, VersionSource), AnalysisError> {
    if let Some(hex) = debug_offsets_version {
        return Ok((PyVersion::from_hex(hex), VersionSource::DebugOffsets));
    }
    if let Some(sym) = elf.symbol("Py_Version")
        && let Some(b) = elf.bytes_at(sym.addr, 4)
    {
        let hex = u32::from_le_bytes(b.try_into().unwrap());
        let v = PyVersion::from_hex(hex);
        if v.major == 3 {
            return Ok((v, VersionSource::PyVersionSymbol));
        }
    }
    let found = version_strings(elf);
    let from_name = minor_from_name(hint);
    let pick = match from_name {
        Some(minor) => found.iter().find(|v| v.minor == minor),
        None if found.len() == 1 => found.first(),
        None => None,
    };
    pick.copied().map(|v| (v, VersionSource::VersionString)).ok_or_else(|| {
        AnalysisError::Unsupported(format!(
            "cannot tell the Python version: no Py_Version, no _Py_DebugOffsets, and {} version strings",
            if found.is_empty() { "no".to_string() } else { format!("ambiguous ({})", found.len()) }
        ))
    })
}

/// The minor version in a name like `libpython3.9.so.1.0` or `python3.10`.
pub fn minor_from_name(name: &str) -> Option<u8> {
    let base = name.rsplit('/').next()?;
    let at = base.find("python3.")? + "python3.".len();
    let digits: String = base[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Distinct versions that end a NUL-terminated string in `.rodata`. The
/// `PY_VERSION` literal may be stored as the tail of a longer string (the
/// linker merges string suffixes, e.g. into `.../Python-3.8.18`).
fn version_strings(elf: &ElfImage) -> Vec<PyVersion> {
    let Some((_, data)) = elf.section_bytes(".rodata") else {
        return Vec::new();
    };
    let mut out: Vec<PyVersion> = Vec::new();
    for s in data.split(|&b| b == 0) {
        for start in memchr_all(s, b'3') {
            let tail = &s[start..];
            let boundary = start == 0 || !(s[start - 1].is_ascii_alphanumeric() || s[start - 1] == b'.');
            if !boundary || tail.len() < 5 || tail.len() > 12 || tail[1] != b'.' {
                continue;
            }
            if let Some(v) = std::str::from_utf8(tail).ok().and_then(PyVersion::parse)
                && !out.contains(&v)
            {
                out.push(v);
            }
        }
    }
    out
}

fn memchr_all(s: &[u8], b: u8) -> impl Iterator<Item = usize> + '_ {
    s.iter().enumerate().filter(move |(_, c)| **c == b).map(|(i, _)| i)
}

/// Detects debug and free-threaded builds. `free_threaded` is the
/// `_Py_DebugOffsets` flag where the build has one.
pub fn flavour(elf: &ElfImage, name: &str, free_threaded: Option<bool>) -> Flavour {
    let base = name.rsplit('/').next().unwrap_or(name);
    let t_suffix = base
        .find("python3.")
        .map(|at| {
            let rest = &base[at + "python3.".len()..];
            rest.trim_start_matches(|c: char| c.is_ascii_digit()).starts_with('t')
        })
        .unwrap_or(false);
    if free_threaded == Some(true) || t_suffix || elf.symbol("_Py_MergeZeroLocalRefcount").is_some() {
        return Flavour::FreeThreaded;
    }
    if is_debug(elf) { Flavour::Debug } else { Flavour::Release }
}

/// A `Py_DEBUG` build (free-threaded ones too, whose layouts differ again).
pub fn is_debug(elf: &ElfImage) -> bool {
    // Only builds with Py_REF_DEBUG (implied by Py_DEBUG) define these.
    elf.symbol("_Py_NegativeRefcount").is_some() || elf.symbol("_Py_RefTotal").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(PyVersion::parse("3.8.18").unwrap().to_string(), "3.8.18");
        assert_eq!(PyVersion::parse("3.14.0rc2").unwrap().to_string(), "3.14.0rc2");
        assert_eq!(PyVersion::parse("3.12.1+").unwrap().minor, 12);
        assert!(PyVersion::parse("2.7.18").is_none());
        assert!(PyVersion::parse("3.x.1").is_none());
        assert_eq!(PyVersion::from_hex(0x030e0af0).to_string(), "3.14.10");
    }

    #[test]
    fn minor_from_file_names() {
        assert_eq!(minor_from_name("/usr/lib/libpython3.9.so.1.0"), Some(9));
        assert_eq!(minor_from_name("/usr/bin/python3.13t"), Some(13));
        assert_eq!(minor_from_name("/usr/bin/python"), None);
    }
}
