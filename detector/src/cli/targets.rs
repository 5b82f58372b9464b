//! `detector targets`: the effective target set and where each target comes
//! from, with every config's state, from the same sources `run` uses.

use std::{collections::BTreeSet, time::Duration};

use serde_json::json;

use super::sources::SourceArgs;
use crate::{
    events::output::Format,
    sources::{Origin, Sources},
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
    let effective = sources.effective();
    match args.format {
        Format::Json => {
            let configs: Vec<_> = sources
                .configs()
                .map(|c| {
                    json!({
                        "origin": c.origin,
                        "name": c.name,
                        "version": c.version,
                        "apply_state": if c.targets.is_ok() { "acknowledged" } else { "error" },
                        "error": c.targets.as_ref().err(),
                        "targets": c.targets.as_ref().map(|t| t.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default(),
                    })
                })
                .collect();
            let targets: Vec<_> = effective
                .iter()
                .map(|(t, from)| json!({"target": t.to_string(), "configs": from.iter().collect::<BTreeSet<_>>()}))
                .collect();
            println!(
                "{}",
                json!({"configs": configs, "targets": targets, "remote_config": {"enabled": rc_stats.is_some(), "error": rc_error}})
            );
        }
        Format::Text => {
            if let Some(e) = &rc_error {
                println!("remote configuration: {e}");
            }
            for c in sources.configs() {
                let version = c.version.map(|v| format!(" v{v}")).unwrap_or_default();
                match &c.targets {
                    Ok(t) => println!("config {:?} {}{version}: acknowledged, {} targets", c.origin, c.name, t.len()),
                    Err(e) => println!("config {:?} {}{version}: error: {e}", c.origin, c.name),
                }
            }
            for (t, from) in &effective {
                let from: Vec<&str> = from.iter().map(String::as_str).collect();
                println!("target {t}  (from {})", from.join(", "));
            }
            if effective.is_empty() {
                println!("no targets");
            }
        }
    }
    Ok(())
}
