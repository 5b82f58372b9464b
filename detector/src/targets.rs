//! Targets: `package.module:Qual.name`, the Remote Configuration format.
//!
//! The module is a dotted path of identifiers; the qualified name is
//! `co_qualname`'s form: identifiers joined by dots, with `<locals>` between a
//! function and something defined inside it (`pkg.mod:outer.<locals>.inner`).
//! Names are ASCII (the kernel compares bytes) and bounded by what the kernel
//! compares ([`detector_common::NAME_LEN`] less the NUL).

use std::{collections::BTreeMap, fmt, str::FromStr};

use detector_common::NAME_LEN;

/// The longest module or qualified name accepted, in bytes.
pub const MAX_PART_LEN: usize = NAME_LEN - 1;

/// Why a target string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Nothing given.
    #[error("empty target: expected `package.module:Qual.name`")]
    Empty,
    /// Whitespace anywhere.
    #[error("target {0:?} contains whitespace")]
    Whitespace(String),
    /// Not ASCII.
    #[error("target {0:?} is not ASCII: non-ASCII identifiers are not supported")]
    NonAscii(String),
    /// No colon, or more than one.
    #[error("target {0:?} must contain exactly one `:` between the module and the qualified name")]
    Colon(String),
    /// A part is too long.
    #[error("target {target:?}: the {part} is {len} bytes; at most {MAX_PART_LEN} are supported")]
    TooLong {
        /// The target.
        target: String,
        /// `module` or `qualified name`.
        part: &'static str,
        /// Its length.
        len: usize,
    },
    /// A dotted component is not an identifier.
    #[error("target {target:?}: {part} component {component:?} is not a Python identifier")]
    Component {
        /// The target.
        target: String,
        /// `module` or `qualified name`.
        part: &'static str,
        /// The offending component.
        component: String,
    },
    /// `<locals>` where it cannot be.
    #[error("target {0:?}: `<locals>` must sit between a function and a name defined in it")]
    Locals(String),
}

/// A validated target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    module: String,
    qualname: String,
}

impl Target {
    /// Parses and validates `module:qualname`.
    pub fn parse(s: &str) -> Result<Self, TargetError> {
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(TargetError::Whitespace(s.to_owned()));
        }
        if !s.is_ascii() {
            return Err(TargetError::NonAscii(s.to_owned()));
        }
        let (module, qualname) = match s.split_once(':') {
            Some((m, q)) if !q.contains(':') => (m, q),
            _ => return Err(TargetError::Colon(s.to_owned())),
        };
        for (part, text) in [("module", module), ("qualified name", qualname)] {
            if text.len() > MAX_PART_LEN {
                return Err(TargetError::TooLong { target: s.to_owned(), part, len: text.len() });
            }
        }
        for c in module.split('.') {
            if !is_identifier(c) {
                return Err(TargetError::Component { target: s.to_owned(), part: "module", component: c.to_owned() });
            }
        }
        let parts: Vec<&str> = qualname.split('.').collect();
        for (i, c) in parts.iter().enumerate() {
            if *c == "<locals>" {
                let inner = i > 0 && i + 1 < parts.len() && parts[i - 1] != "<locals>";
                if !inner {
                    return Err(TargetError::Locals(s.to_owned()));
                }
            } else if !is_identifier(c) {
                return Err(TargetError::Component {
                    target: s.to_owned(),
                    part: "qualified name",
                    component: (*c).to_owned(),
                });
            }
        }
        Ok(Target { module: module.to_owned(), qualname: qualname.to_owned() })
    }

    /// The module (`__module__`).
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The qualified name (`co_qualname`).
    pub fn qualname(&self) -> &str {
        &self.qualname
    }

    /// The qualified name's components.
    pub fn qualname_parts(&self) -> impl Iterator<Item = &str> {
        self.qualname.split('.')
    }

    /// The function's own name (`co_name`): the last component.
    pub fn name(&self) -> &str {
        self.qualname.rsplit('.').next().unwrap_or(&self.qualname)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.module, self.qualname)
    }
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::parse(s)
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn is_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// The active targets with stable ids: an id is never reused within a run,
/// so counts keyed by id always belong to one target.
#[derive(Clone, Debug, Default)]
pub struct TargetSet {
    ids: BTreeMap<Target, u32>,
    next: u32,
}

impl TargetSet {
    /// The id of `t`, assigning one if it is new.
    pub fn insert(&mut self, t: Target) -> u32 {
        if let Some(&id) = self.ids.get(&t) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(t, id);
        id
    }

    /// Removes `t`, returning its id.
    pub fn remove(&mut self, t: &Target) -> Option<u32> {
        self.ids.remove(t)
    }

    /// The id of `t`.
    pub fn id(&self, t: &Target) -> Option<u32> {
        self.ids.get(t).copied()
    }

    /// The target with id `id`.
    pub fn get(&self, id: u32) -> Option<&Target> {
        self.ids.iter().find(|(_, i)| **i == id).map(|(t, _)| t)
    }

    /// Targets and ids, ordered by target.
    pub fn iter(&self) -> impl Iterator<Item = (&Target, u32)> {
        self.ids.iter().map(|(t, i)| (t, *i))
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_remote_configuration_forms() {
        for s in
            ["requests.sessions:Session.send", "m:f", "pkg.mod:outer.<locals>.inner", "a.b.c:A.B.__init__", "_priv:_x1"]
        {
            let t = Target::parse(s).unwrap();
            assert_eq!(t.to_string(), s);
        }
        let t = Target::parse("pkg.mod:outer.<locals>.inner").unwrap();
        assert_eq!((t.module(), t.qualname(), t.name()), ("pkg.mod", "outer.<locals>.inner", "inner"));
    }

    #[test]
    fn rejects_malformed_targets_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("m f:g", "whitespace"),
            ("m:f\n", "whitespace"),
            ("mod", "exactly one"),
            ("a:b:c", "exactly one"),
            (":f", "module component \"\""),
            ("m:", "qualified name component \"\""),
            ("m..x:f", "module component \"\""),
            ("m:A..f", "component \"\""),
            ("1m:f", "module component \"1m\""),
            ("m:f-g", "component \"f-g\""),
            ("m:<locals>.f", "<locals>"),
            ("m:f.<locals>", "<locals>"),
            ("m:f.<locals>.<locals>.g", "<locals>"),
            ("m:caf\u{e9}", "not ASCII"),
        ];
        for (s, want) in cases {
            let e = Target::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s:?}: {e}");
        }
        let long = format!("m:{}", "f".repeat(MAX_PART_LEN + 1));
        assert!(Target::parse(&long).unwrap_err().to_string().contains("at most 127"));
        assert!(Target::parse(&format!("m:{}", "f".repeat(MAX_PART_LEN))).is_ok());
    }

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut s = TargetSet::default();
        let a = s.insert(Target::parse("m:a").unwrap());
        let b = s.insert(Target::parse("m:b").unwrap());
        assert_eq!(s.insert(Target::parse("m:a").unwrap()), a);
        s.remove(&Target::parse("m:a").unwrap());
        let a2 = s.insert(Target::parse("m:a").unwrap());
        assert!(a2 != a && a2 != b);
        assert_eq!(s.get(b).unwrap().to_string(), "m:b");
    }
}
