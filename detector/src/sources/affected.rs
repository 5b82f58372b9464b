//! Whether an installed version of a dependency is one an advisory affects:
//! its `package_versions` are PEP 440 specifier sets, any of which matching
//! makes the version vulnerable.

use std::str::FromStr;

use pep440_rs::{Version, VersionSpecifiers};

/// Whether a process's copy of a dependency is affected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Affected {
    /// Its version matches one of the specifier sets (or the advisory
    /// names none).
    Yes {
        /// The version installed.
        version: String,
    },
    /// Its version matches none.
    No {
        /// The version installed.
        version: String,
    },
    /// The version is not one PEP 440 can order.
    Unknown {
        /// Why.
        why: String,
    },
}

/// Checks a catalog's specifier sets: the reason the first bad one is bad.
pub fn check_specifiers(sets: &[String]) -> Result<(), String> {
    for s in sets {
        VersionSpecifiers::from_str(s).map_err(|e| format!("`{s}` is not a PEP 440 specifier set: {e}"))?;
    }
    Ok(())
}

/// Whether `version` is in any of `sets` (checked when the catalog was
/// read); no sets means every version.
pub fn affected(sets: &[String], version: &str) -> Affected {
    let parsed = match Version::from_str(version) {
        Ok(v) => v,
        Err(e) => return Affected::Unknown { why: format!("version `{version}` is not PEP 440: {e}") },
    };
    let matches = |s: &String| VersionSpecifiers::from_str(s).is_ok_and(|set| set.contains(&parsed));
    if sets.is_empty() || sets.iter().any(matches) {
        Affected::Yes { version: version.to_owned() }
    } else {
        Affected::No { version: version.to_owned() }
    }
}

/// A distribution name as packaging normalizes it (PEP 503): lower case,
/// each run of `-`, `_` and `.` one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn versions_in_any_set_are_affected() {
        let s = sets(&["<2.32.0", ">=3.0,<3.0.2"]);
        assert!(matches!(affected(&s, "2.31.0"), Affected::Yes { .. }));
        assert!(matches!(affected(&s, "2.32.0"), Affected::No { .. }));
        assert!(matches!(affected(&s, "3.0.1"), Affected::Yes { .. }));
        assert!(matches!(affected(&s, "3.0.2"), Affected::No { .. }));
        // An installed pre-release is a version like any other (packaging's
        // `contains` would leave it out by default: a missed finding)...
        assert!(matches!(affected(&s, "2.31.1rc1"), Affected::Yes { .. }));
        // ...but `<V` excludes V's own pre-releases (PEP 440).
        assert!(matches!(affected(&s, "2.32.0rc1"), Affected::No { .. }));
        // Local versions and post-releases order as pip orders them.
        assert!(matches!(affected(&sets(&["<=2.31.0"]), "2.31.0+ubuntu1"), Affected::Yes { .. }));
        assert!(matches!(affected(&sets(&["<=2.31.0"]), "2.31.0.post1"), Affected::No { .. }));
        assert!(matches!(affected(&sets(&["~=1.4"]), "1.9"), Affected::Yes { .. }));
        assert!(matches!(affected(&sets(&["~=1.4"]), "2.0"), Affected::No { .. }));
    }

    #[test]
    fn no_sets_means_every_version_and_odd_versions_are_unknown() {
        assert!(matches!(affected(&[], "0.1"), Affected::Yes { .. }));
        let unknown = affected(&sets(&["<2"]), "not-a-version");
        assert!(matches!(&unknown, Affected::Unknown { why } if why.contains("not PEP 440")), "{unknown:?}");
    }

    #[test]
    fn bad_specifiers_are_refused_with_the_reason() {
        assert!(check_specifiers(&sets(&["<2.32.0", ">=1,<2"])).is_ok());
        let e = check_specifiers(&sets(&["<2", "<<2"])).unwrap_err();
        assert!(e.contains("`<<2`"), "{e}");
    }

    #[test]
    fn names_normalize_as_packaging_does() {
        assert_eq!(normalize("Jinja2"), "jinja2");
        assert_eq!(normalize("zope.interface"), "zope-interface");
        assert_eq!(normalize("Foo__Bar-.baz"), "foo-bar-baz");
        assert_eq!(normalize("typing_extensions"), "typing-extensions");
    }
}
