//! What a config says beyond its targets: the advisory each belongs to
//! (dd-trace-py's reachability catalog entries carry the vulnerable
//! dependency, the versions affected and the vulnerability), and the
//! entries it skipped because they are for another language.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::targets::Target;

/// A catalog entry's advisory: what makes its targets worth watching.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Advisory {
    /// The entry's id: the tracer's own (`vuln-001`) or an advisory's
    /// (a GHSA id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The dependency the targets belong to, as the catalog names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
    /// The dependency's versions affected: PEP 440 specifiers, any of which
    /// matches (none: every version).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// The vulnerability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vulnerability: Option<Vulnerability>,
}

/// A vulnerability as a catalog entry describes it; fields the agent does
/// not use are kept as given.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Vulnerability {
    /// Its id (`CVE-...`, `GHSA-...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its severity, as the catalog says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// What it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Anything else the entry says about it, as text.
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

/// A catalog entry not for this agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Where it is in the payload (`targets[3]`).
    pub at: String,
    /// Its id, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why it was skipped.
    pub reason: String,
}

/// What one config says: its targets, the advisories naming each, and the
/// entries it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Every target, each once, in order of appearance.
    pub targets: Vec<Target>,
    /// The advisories naming each target (none for a plain list).
    pub advisories: BTreeMap<Target, Vec<Advisory>>,
    /// Entries for another language.
    pub skipped: Vec<Skipped>,
}

impl Catalog {
    /// A catalog of plain targets.
    pub fn of(targets: Vec<Target>) -> Self {
        Catalog { targets, ..Catalog::default() }
    }
}
