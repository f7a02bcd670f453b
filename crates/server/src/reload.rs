//! Reload: the fleet file is re-read every [`RELOAD_EVERY`] and on SIGHUP. A valid change
//! becomes the fleet's next generation (`Fleet::successor`): new streams take it, open ones
//! finish on the one they started with, and endpoints that stay keep their load and in-flight
//! counts. Pollers and flow-control dispatchers ([`Workers`]) are restarted for it. A file that
//! does not validate, or that changes the `server` section (listeners, body mode, TLS: they
//! need a restart), is refused with a logged reason and the last good fleet stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetpick_config::{ConfigError, FleetConfig, FleetFile};
use fleetpick_core::fleet::{Fleet, FleetCell};

use crate::poller;
use crate::telemetry::Metrics;

/// How often the fleet file is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// A fleet file, the command-line override re-applied to each re-read, and the configuration
/// as loaded (overrides applied): what a re-read is compared with.
#[derive(Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// `--region`, which overrides the file's `picker.region`.
    pub region: Option<String>,
    pub loaded: FleetConfig,
}

impl ConfigSource {
    /// Loads `path` with the `region` override applied: what `serve` starts on.
    pub fn load(path: PathBuf, region: Option<String>) -> Result<ConfigSource, ConfigError> {
        let loaded = read_with(&path, region.as_deref())?;
        Ok(ConfigSource {
            path,
            region,
            loaded,
        })
    }

    /// Reads and validates the file again, with the override applied.
    fn read(&self) -> Result<FleetConfig, ConfigError> {
        read_with(&self.path, self.region.as_deref())
    }
}

fn read_with(path: &std::path::Path, region: Option<&str>) -> Result<FleetConfig, ConfigError> {
    let mut cfg = FleetConfig::load(path)?;
    if let Some(region) = region {
        cfg.check_region(region)?;
        cfg.file.picker.region = Some(region.to_string());
    }
    Ok(cfg)
}
/// The tasks that serve one generation of the fleet: a poller per endpoint, the cluster-health
/// watcher and the flow-control dispatchers. Dropping it stops them.
#[derive(Debug)]
pub struct Workers {
    _pollers: tokio::task::JoinSet<()>,
    _dispatchers: tokio::task::JoinSet<()>,
}

impl Workers {
    pub fn start(fleet: &Arc<Fleet>) -> Result<Workers, reqwest::Error> {
        Ok(Workers {
            _pollers: poller::spawn(fleet)?,
            _dispatchers: crate::dispatch::spawn_dispatchers(fleet),
        })
    }
}

/// Re-reads the fleet file every [`RELOAD_EVERY`] and on SIGHUP, and applies a valid change as
/// the fleet's next generation (see the module's docs). Contents are compared, not bytes or
/// times, so a change made between the first load and the first re-read is not missed, and a
/// change to a manifest the file names counts too. A refusal is logged and counted once per
/// reason (again on SIGHUP), not every second.
pub async fn watch_config(
    source: ConfigSource,
    fleet: Arc<FleetCell>,
    metrics: Arc<Metrics>,
    mut workers: Workers,
) {
    let mut hangups = hangup_signals();
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loaded = source.loaded.clone();
    let mut refused: Option<String> = None;
    let file = source.path.display().to_string();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = next_hangup(&mut hangups) => {
                tracing::info!(%file, "SIGHUP: re-reading the fleet file");
                refused = None;
            }
        }
        let prepared = source
            .read()
            .map_err(|e| e.to_string())
            .and_then(|cfg| restart_only_unchanged(&loaded.file, &cfg.file).map(|()| cfg))
            .and_then(|next| {
                if next == loaded {
                    return Ok(None);
                }
                let successor = Arc::new(fleet.load().successor(&next));
                let started = Workers::start(&successor)
                    .map_err(|e| format!("cannot start its pollers: {e}"))?;
                Ok(Some((next, successor, started)))
            });
        let (next, successor, started) = match prepared {
            Ok(Some(p)) => p,
            Ok(None) => {
                refused = None;
                continue;
            }
            Err(why) => {
                if refused.as_ref() != Some(&why) {
                    metrics.reloaded(false);
                    tracing::error!(%file, %why, "fleet file not reloaded; the last good one stays");
                    refused = Some(why);
                }
                continue;
            }
        };
        let current = fleet.load_full();
        metrics.switch(&fleet, successor.clone());
        current.retire(&successor);
        // The old generation's pollers and dispatchers stop here.
        drop(std::mem::replace(&mut workers, started));
        metrics.reloaded(true);
        tracing::info!(
            %file,
            generation = successor.generation,
            endpoints = successor.endpoints.len(),
            "fleet file reloaded"
        );
        loaded = next;
        refused = None;
    }
}

/// SIGHUP, where there is such a signal and a handler can be installed.
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the fleet file is re-read every second only");
            None
        }
    }
}

async fn next_hangup(signals: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signals {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Refuses a change to what only a restart can apply: the `server` section (the listeners are
/// bound, the body mode is in Envoy's config too).
fn restart_only_unchanged(old: &FleetFile, new: &FleetFile) -> Result<(), String> {
    if old.server != new.server {
        return Err("the server section changed: restart fleetpick to apply it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(extra: &str) -> FleetFile {
        FleetConfig::parse(
            &format!("clusters: [{{name: a}}]\npools: [{{name: p, models: [m], target_port: 80, endpoints: {{a: [10.0.0.1]}}}}]\n{extra}"),
            "t",
        )
        .unwrap()
        .file
    }

    #[test]
    fn the_server_section_needs_a_restart_and_the_rest_does_not() {
        let base = file("imports: [{pool: p}]\n");
        let drained = file("imports: [{pool: p, policy: {capacity_scaler: 0}}]\n");
        assert!(restart_only_unchanged(&base, &drained).is_ok());
        let weights = file("scheduler: {weights: {queue: 5}}\nflow_control: {enabled: true}\n");
        assert!(restart_only_unchanged(&base, &weights).is_ok());
        let moved = file("server: {listen: 127.0.0.1:9100}\n");
        assert!(
            restart_only_unchanged(&base, &moved)
                .unwrap_err()
                .contains("server section")
        );
    }
}
