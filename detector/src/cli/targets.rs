//! `detector targets`: the effective target set and where each target comes
//! from, with every config's state, from the same sources `run` uses.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::sources::SourceArgs;
use crate::{
    agent::exposure::{self, Exposure},
    events::output::Format,
    interp::cache::AnalysisCache,
    pyproc::{
        self,
        distributions::{self, Installed},
    },
    sources::{
        Origin, Sources,
        catalog::{Advisory, Skipped},
    },
};

/// Arguments of `detector targets`.
#[derive(Debug, clap::Args)]
pub struct TargetsArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// How long to wait for the Datadog Agent's first answer, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub wait: f64,
    /// Also read which version of each advisory's dependency process PID
    /// has installed (along its own `sys.path`, inside its root), and show
    /// whether that leaves each target watched there.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
}

/// Runs `detector targets`.
pub async fn run(args: TargetsArgs) -> anyhow::Result<()> {
    let (mut updates, rc_stats) = args.sources.start().await?;
    let mut sources = Sources::default();
    let mut rc_answered = false;
    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.wait.max(0.0)));
    tokio::pin!(deadline);
    // Flags and files arrive at once; Remote Configuration after a poll.
    loop {
        tokio::select! {
            Some(delivery) = updates.recv() => {
                let update = delivery.update;
                rc_answered |= update.origin == Origin::RemoteConfig;
                sources.apply(update);
                // Nothing to apply to: parsed is all there is.
                if let Some(applied) = delivery.applied {
                    let _ = applied.send(Ok(()));
                }
                if rc_stats.is_none() || rc_answered {
                    // Everything that will answer has answered.
                    if updates.is_empty() { break; }
                }
            }
            _ = &mut deadline => break,
        }
    }
    let rc_error = rc_stats
        .as_ref()
        .filter(|_| !rc_answered)
        .map(|s| s.last_error.lock().unwrap().clone().unwrap_or_else(|| "no answer from the agent yet".into()));
    let mut report = TargetsReport::of(&sources, RemoteConfigReport { enabled: rc_stats.is_some(), error: rc_error });
    if let Some(pid) = args.pid {
        report.read_process(pid, &sources)?;
    }
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Text => print!("{}", report.text()),
    }
    Ok(())
}

/// What `detector targets` reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetsReport {
    /// Every config, ordered by origin and name.
    pub configs: Vec<ConfigReport>,
    /// The active targets.
    pub targets: Vec<TargetReport>,
    /// Whether Remote Configuration is on, and why it has not answered.
    pub remote_config: RemoteConfigReport,
    /// With `--pid`: what that process has of the constrained dependencies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessVersions>,
}

/// What one process has of the dependencies whose versions the catalog
/// constrains.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessVersions {
    /// The process.
    pub pid: u32,
    /// Each dependency (normalized name) and what it has of it.
    pub dependencies: BTreeMap<String, Installed>,
}

/// A config, as `detector targets` reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConfigReport {
    /// Its source.
    pub origin: Origin,
    /// Its name.
    pub name: String,
    /// Its version, where the source has one.
    pub version: Option<u64>,
    /// `acknowledged` or `error`.
    pub apply_state: String,
    /// Why it was rejected.
    pub error: Option<String>,
    /// Its targets.
    pub targets: Vec<String>,
    /// Its entries for another language.
    pub skipped: Vec<Skipped>,
}

/// An active target, as `detector targets` reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetReport {
    /// The target.
    pub target: String,
    /// The configs naming it.
    pub configs: BTreeSet<String>,
    /// The advisories naming it.
    pub advisories: Vec<Advisory>,
    /// With `--pid`, if an advisory constrains its dependency's version:
    /// what the version that process has means for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposure: Option<Exposure>,
}

/// Remote Configuration's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoteConfigReport {
    /// Whether it is on.
    pub enabled: bool,
    /// Why it has not answered, if it has not.
    pub error: Option<String>,
}

impl TargetsReport {
    fn of(sources: &Sources, remote_config: RemoteConfigReport) -> Self {
        let configs = sources
            .configs()
            .map(|c| ConfigReport {
                origin: c.origin,
                name: c.name.clone(),
                version: c.version,
                apply_state: if c.targets.is_ok() { "acknowledged" } else { "error" }.into(),
                error: c.targets.as_ref().err().cloned(),
                targets: c.targets.iter().flat_map(|c| &c.targets).map(ToString::to_string).collect(),
                skipped: c.targets.iter().flat_map(|c| c.skipped.clone()).collect(),
            })
            .collect();
        let mut advisories = sources.advisories();
        let targets = sources
            .effective()
            .into_iter()
            .map(|(t, configs)| TargetReport {
                target: t.to_string(),
                configs,
                advisories: advisories.remove(&t).unwrap_or_default(),
                exposure: None,
            })
            .collect();
        TargetsReport { configs, targets, remote_config, process: None }
    }

    /// Reads what `pid` has of the constrained dependencies, and what that
    /// means for each target.
    fn read_process(&mut self, pid: u32, sources: &Sources) -> anyhow::Result<()> {
        let names = exposure::dependencies(&sources.advisories());
        let process = pyproc::locate(pid, &AnalysisCache::default())?;
        let dependencies = distributions::installed(&process, &names)?;
        for t in &mut self.targets {
            t.exposure = exposure::exposure(&t.advisories, Some(&dependencies));
        }
        self.process = Some(ProcessVersions { pid, dependencies });
        Ok(())
    }

    /// The report as lines of text.
    fn text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.remote_config.error {
            out += &format!("remote configuration: {e}\n");
        }
        for c in &self.configs {
            let version = c.version.map(|v| format!(" v{v}")).unwrap_or_default();
            match &c.error {
                None => {
                    out += &format!(
                        "config {:?} {}{version}: acknowledged, {} targets\n",
                        c.origin,
                        c.name,
                        c.targets.len()
                    )
                }
                Some(e) => out += &format!("config {:?} {}{version}: error: {e}\n", c.origin, c.name),
            }
            for s in &c.skipped {
                out += &format!("  skipped {} {}: {}\n", s.at, s.id.as_deref().unwrap_or(""), s.reason);
            }
        }
        for t in &self.targets {
            let from: Vec<&str> = t.configs.iter().map(String::as_str).collect();
            out += &format!("target {}  (from {})\n", t.target, from.join(", "));
            for a in &t.advisories {
                out += &format!("  advisory {}\n", advisory_text(a));
            }
            if let (Some(p), Some(e)) = (&self.process, &t.exposure) {
                let watched = if e.watched() { "watched" } else { "not watched" };
                out += &format!("  in pid {}: {watched}: {}\n", p.pid, serde_json::to_string(e).unwrap_or_default());
            }
        }
        if self.targets.is_empty() {
            out += "no targets\n";
        }
        out
    }
}

/// An advisory on one line: id, dependency and versions, vulnerability.
fn advisory_text(a: &Advisory) -> String {
    let mut parts = vec![a.id.clone().unwrap_or_else(|| "(no id)".into())];
    if let Some(d) = &a.dependency {
        let versions = if a.versions.is_empty() { "any version".into() } else { a.versions.join(" or ") };
        parts.push(format!("{d} {versions}"));
    }
    if let Some(v) = &a.vulnerability {
        parts.extend(v.id.clone());
        parts.extend(v.severity.clone());
    }
    parts.join(", ")
}
