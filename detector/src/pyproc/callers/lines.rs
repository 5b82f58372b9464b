//! A code object's line table, per format: which source line an
//! instruction belongs to. Every loop is bounded by the table's length.

/// The line of the instruction at byte `offset` of the bytecode, from the
/// table of a 3.`minor` code object whose first line is `first`; `None`
/// where the table gives none, or is malformed.
pub(crate) fn line_of(minor: u8, table: &[u8], first: i32, offset: u64) -> Option<u32> {
    let line = match minor {
        8 | 9 => lnotab(table, first, offset),
        10 => linetable_310(table, first, offset),
        _ => locations(table, first, offset / 2),
    }?;
    u32::try_from(line).ok()
}

/// 3.8, 3.9 `co_lnotab`: (bytecode increment, signed line increment) pairs.
fn lnotab(table: &[u8], first: i32, offset: u64) -> Option<i64> {
    let (mut addr, mut line) = (0u64, first as i64);
    for pair in table.chunks_exact(2) {
        addr += pair[0] as u64;
        if addr > offset {
            break;
        }
        line += pair[1] as i8 as i64;
    }
    Some(line)
}

/// 3.10 `co_linetable` (PEP 626): (range length, signed line delta) pairs,
/// -128 for a range with no line.
fn linetable_310(table: &[u8], first: i32, offset: u64) -> Option<i64> {
    let (mut start, mut computed) = (0u64, first as i64);
    for pair in table.chunks_exact(2) {
        let end = start + pair[0] as u64;
        let line = match pair[1] as i8 {
            -128 => None,
            delta => {
                computed += delta as i64;
                Some(computed)
            }
        };
        if (start..end).contains(&offset) {
            return line;
        }
        start = end;
    }
    None
}

/// 3.11+ location table: entries of code units, each a header byte (kind,
/// length) and the kind's varints; `unit` is the instruction's index.
fn locations(table: &[u8], first: i32, unit: u64) -> Option<i64> {
    let mut r = Reader { table, at: 0 };
    let (mut addr, mut line) = (0u64, first as i64);
    while let Some(header) = r.byte() {
        if header & 0x80 == 0 {
            return None;
        }
        let (kind, len) = ((header >> 3) & 15, (header & 7) as u64 + 1);
        let this = match kind {
            15 => None,
            14 => {
                line += r.svarint()?;
                // End line, start and end columns.
                for _ in 0..3 {
                    r.varint()?;
                }
                Some(line)
            }
            13 => {
                line += r.svarint()?;
                Some(line)
            }
            10..=12 => {
                line += kind as i64 - 10;
                r.byte()?;
                r.byte()?;
                Some(line)
            }
            _ => {
                r.byte()?;
                Some(line)
            }
        };
        if (addr..addr + len).contains(&unit) {
            return this;
        }
        addr += len;
    }
    None
}

struct Reader<'a> {
    table: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.table.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// Six bits a byte, low first, bit 6 saying more follow.
    fn varint(&mut self) -> Option<i64> {
        let mut b = self.byte()?;
        let (mut value, mut shift) = ((b & 63) as i64, 0);
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift > 60 {
                return None;
            }
            value |= ((b & 63) as i64) << shift;
        }
        Some(value)
    }

    fn svarint(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some(if v & 1 != 0 { -(v >> 1) } else { v >> 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Tables CPython made for one function (`f` at line 1, calling `g` on
    /// line 6 and `h` on line 8), with the line each call's bytecode
    /// offset has, as `dis` tells.
    #[test]
    fn each_format_gives_the_lines_cpython_does() {
        type Case<'a> = (u8, &'a str, &'a [(u64, u32)]);
        let cases: [Case; 4] = [
            (9, "0001040104010802040102ff0402", &[(22, 6), (30, 8), (32, 8)]),
            (10, "0401040108010402020104ff0802", &[(22, 6), (30, 8), (32, 8)]),
            (
                12,
                "8000d808098041d90708d80809885189068801e408098821d80a0bf30301090d8041e40b0c88518b34804b",
                &[(34, 6), (56, 8), (64, 8)],
            ),
            (
                13,
                "8000d808098041de0708d80809885189068801e408098821d80a0bf30301090d8041e40b0c88518b34804b",
                &[(44, 6), (66, 8), (74, 8)],
            ),
        ];
        for (minor, table, expected) in cases {
            for &(offset, line) in expected {
                assert_eq!(line_of(minor, &hex(table), 1, offset), Some(line), "3.{minor} at {offset}");
            }
        }
    }

    #[test]
    fn malformed_tables_give_no_line() {
        assert_eq!(line_of(12, &[0x00, 0x01], 1, 0), None, "no header bit");
        assert_eq!(line_of(12, &[0xf0], 1, 0), None, "a long entry cut short");
        assert_eq!(line_of(12, &[0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 1, 0), None);
        assert_eq!(line_of(10, &[2, 0], 1, 9), None, "past the table");
    }
}
