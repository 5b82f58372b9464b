//! The flags that say where targets come from, shared by `run` and
//! `targets`, and starting those sources.

use std::path::PathBuf;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::{
    rc::poller::{self, Settings},
    sources::{Config, Delivery, Origin, Update, catalog::Catalog, file},
    targets::Target,
};

/// Where targets come from.
#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// A payload file, a directory of `*.json` payloads (each one config), or
    /// `builtin` for the default compiled into the detector. Re-read when it
    /// changes. Repeatable.
    #[arg(long = "targets", value_name = "PATH|builtin")]
    pub files: Vec<PathBuf>,
    /// A function to watch, `package.module:Qual.name`. Repeatable.
    #[arg(long = "target", value_name = "MODULE:QUALNAME")]
    pub targets: Vec<String>,
    /// The Datadog Agent to take targets from through Remote Configuration
    /// (product SCA_DETECTION). Defaults to DD_TRACE_AGENT_URL, else
    /// DD_AGENT_HOST and DD_TRACE_AGENT_PORT, else http://localhost:8126.
    /// Remote Configuration is on when an agent is given this way or
    /// through those variables, or when no other source is.
    #[arg(long, value_name = "URL")]
    pub rc_agent: Option<String>,
    /// Do not use Remote Configuration.
    #[arg(long, conflicts_with = "rc_agent")]
    pub no_rc: bool,
}

impl SourceArgs {
    /// The `--target` flags as one config (validated: an invalid one is an
    /// error of the command line, not a rejected config).
    pub fn flags(&self) -> anyhow::Result<Option<Config>> {
        if self.targets.is_empty() {
            return Ok(None);
        }
        let targets = self.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
        let targets = Ok(Catalog::of(targets));
        Ok(Some(Config { origin: Origin::Flags, name: "--target".into(), version: None, targets }))
    }

    /// Whether an agent is given (the flag or the environment).
    fn agent_configured(&self) -> bool {
        self.rc_agent.is_some()
            || ["DD_TRACE_AGENT_URL", "DD_AGENT_HOST"]
                .iter()
                .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
    }

    /// The Datadog Agent to report to: the one Remote Configuration polls,
    /// or one the environment gives with Remote Configuration off.
    pub fn agent(&self) -> anyhow::Result<Option<String>> {
        if let Some(rc) = self.rc()? {
            return Ok(Some(rc.url));
        }
        if !self.agent_configured() {
            return Ok(None);
        }
        Settings::from_env(self.rc_agent.as_deref()).map(|s| Some(s.url)).map_err(anyhow::Error::msg)
    }

    /// Remote Configuration settings, if it is on.
    pub fn rc(&self) -> anyhow::Result<Option<Settings>> {
        let other_sources = !self.files.is_empty() || !self.targets.is_empty();
        if self.no_rc || (!self.agent_configured() && other_sources) {
            return Ok(None);
        }
        Settings::from_env(self.rc_agent.as_deref())
            .map(Some)
            .map_err(anyhow::Error::msg)
            .context("remote configuration")
    }

    /// Starts every source; each publishes its configs on the returned
    /// channel (the flags at once). Returns the RC poller's counters if RC
    /// is on.
    pub async fn start(&self) -> anyhow::Result<(mpsc::Receiver<Delivery>, Option<std::sync::Arc<poller::Stats>>)> {
        let (tx, rx) = mpsc::channel(16);
        if let Some(flags) = self.flags()? {
            tx.send(Update { origin: Origin::Flags, configs: vec![flags] }.into()).await?;
        }
        if !self.files.is_empty() {
            // Read now, so the files' targets are in place before anything
            // is attached; the watcher then only reports changes.
            tx.send(Update { origin: Origin::File, configs: file::read(&self.files) }.into()).await?;
            tokio::spawn(file::watch(self.files.clone(), tx.clone()));
        }
        let stats = match self.rc()? {
            Some(settings) => {
                tracing::info!(agent = %settings.url, interval = ?settings.interval, "polling remote configuration");
                let stats = std::sync::Arc::new(poller::Stats::default());
                tokio::spawn(poller::run(settings, tx.clone(), stats.clone()));
                Some(stats)
            }
            None => None,
        };
        Ok((rx, stats))
    }
}
