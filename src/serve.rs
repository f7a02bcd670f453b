//! `fleetpick serve`: puts the parts together. The fleet from the fleet file, one poller task per
//! endpoint, the ext_proc service and gRPC health on one listener, until `shutdown` resolves.
//!
//! Health: `grpc.health.v1` answers for `envoy.service.ext_proc.v3.ExternalProcessor` (and the
//! empty service name): SERVING while at least one endpoint is eligible, NOT_SERVING otherwise,
//! so that Envoy's active health check can fail open when the picker has nothing to offer.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::collect::poller;
use crate::config::{FleetConfig, FleetFile};
use crate::extproc::{Picker, Settings};
use crate::fleet::Fleet;
use crate::telemetry::{self, Metrics};

/// The gRPC service name Envoy's health check asks about.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// How often health follows the fleet's eligibility.
const HEALTH_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the metrics poller's HTTP client: {0}")]
    Poller(#[from] reqwest::Error),
    #[error("the gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Serves the picker for the fleet file `cfg` on `listener` until `shutdown` resolves.
pub async fn serve(
    cfg: FleetConfig,
    io: Io,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let fleet = Arc::new(Fleet::new(&cfg));
    run(fleet, &cfg, io, shutdown).await
}

/// What `serve` talks to: the ext_proc gRPC listener, optionally fleetpick's own Prometheus
/// `/metrics` listener, and optionally the fleet file to watch for policy changes.
#[derive(Debug)]
pub struct Io {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    /// The fleet file to re-read every [`RELOAD_EVERY`]: a change confined to the imports'
    /// backend policies is applied at once; any other change is refused (it needs a restart).
    pub config_file: Option<ConfigSource>,
}

/// A fleet file and its contents as loaded (before command-line overrides): what a re-read is
/// compared with.
#[derive(Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub loaded: FleetFile,
}

/// How often the fleet file is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Serves the picker for `fleet` (built from `cfg`), which the caller may keep watching.
pub async fn run(
    fleet: Arc<Fleet>,
    cfg: &FleetConfig,
    io: Io,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let _pollers = poller::spawn(&fleet)?;
    let _dispatchers = crate::flow::spawn_dispatchers(&fleet);
    let metrics = Arc::new(Metrics::new(&fleet));
    // Set once shutdown begins: health says NOT_SERVING from then on, while open streams end.
    let draining = Arc::new(AtomicBool::new(false));
    // Stopped (aborted) when this function returns: a scrape has nothing to finish.
    let metrics_task = io.metrics.map(|l| {
        let (metrics, fleet, draining) = (metrics.clone(), fleet.clone(), draining.clone());
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = telemetry::serve(l, metrics, fleet, draining).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        }))
    });
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health_fleet = fleet.clone();
    let health_draining = draining.clone();
    let stop_reporter = reporter.clone();
    let health = tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        loop {
            tick.tick().await;
            let status =
                if !health_draining.load(Ordering::Relaxed) && health_fleet.eligible_count() > 0 {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
            if last != Some(status) {
                tracing::info!(?status, "ext_proc health");
                reporter.set_service_status(EXT_PROC_SERVICE, status).await;
                reporter.set_service_status("", status).await;
                last = Some(status);
            }
        }
    });
    let watcher = io.config_file.map(|source| {
        AbortOnDrop(tokio::spawn(watch_config(
            source,
            fleet.clone(),
            metrics.clone(),
        )))
    });
    let file = &cfg.file;
    let grace = Duration::from_millis(file.server.shutdown_grace_ms);
    let picker = Picker::new(
        fleet,
        Settings {
            weights: file.scheduler.weights,
            fallbacks: file.scheduler.fallbacks,
            max_body_bytes: file.server.max_body_bytes,
            body_mode: file.server.body_mode,
        },
        metrics,
    );
    // Nodelay on the accepted sockets themselves (the builder's setting does not reach a
    // listener we bound): with Nagle's algorithm, small ext_proc answers waited for delayed
    // ACKs and requests stalled about 40 ms.
    let incoming = TcpIncoming::from(io.grpc).with_nodelay(Some(true));
    // On the signal: NOT_SERVING at once (Envoy's health check stops sending new requests
    // here), no new connections, open streams go on until they end or the grace runs out.
    let signalled = Arc::new(tokio::sync::Notify::new());
    let stop = {
        let (draining, signalled) = (draining.clone(), signalled.clone());
        async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            stop_reporter
                .set_service_status(EXT_PROC_SERVICE, ServingStatus::NotServing)
                .await;
            stop_reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: open streams may finish"
            );
            signalled.notify_one();
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(picker.into_service())
        .serve_with_incoming_shutdown(incoming, stop);
    let result = tokio::select! {
        r = server => r,
        () = async {
            signalled.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace over: streams still open are cut");
            Ok(())
        }
    };
    health.abort();
    drop((metrics_task, watcher));
    Ok(result?)
}

/// Re-reads the fleet file every [`RELOAD_EVERY`] and applies a change confined to the
/// imports' backend policies. A file that does not parse, or changes anything else, is refused
/// with a log line and changes nothing. Contents are compared, not bytes or times, so a change
/// made between the first load and the first re-read is not missed.
async fn watch_config(source: ConfigSource, fleet: Arc<Fleet>, metrics: Arc<Metrics>) {
    let ConfigSource { path, mut loaded } = source;
    let mut last_text: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(text) = tokio::fs::read(&path).await else {
            continue;
        };
        if last_text.as_deref() == Some(&text[..]) {
            continue;
        }
        last_text = Some(text.clone());
        let parsed = std::str::from_utf8(&text)
            .map_err(|e| format!("{}: not UTF-8: {e}", path.display()))
            .and_then(|t| {
                FleetConfig::parse(t, &path.display().to_string()).map_err(|e| e.to_string())
            });
        let cfg = match parsed {
            Ok(cfg) if cfg.file == loaded => continue,
            Ok(cfg) => cfg,
            Err(why) => {
                metrics.reloaded(false);
                tracing::error!(file = %path.display(), %why, "fleet file not reloaded");
                continue;
            }
        };
        let applied = only_policies_changed(&loaded, &cfg.file)
            .and_then(|()| fleet.reload_policies(&cfg))
            .map_err(|why| format!("{why}: restart fleetpick to apply this file"));
        metrics.reloaded(applied.is_ok());
        match applied {
            Ok(()) => {
                loaded = cfg.file;
                tracing::info!(file = %path.display(), "backend policies reloaded");
            }
            Err(why) => tracing::error!(file = %path.display(), %why, "fleet file not reloaded"),
        }
    }
}

/// Whether `new` differs from `old` only in the imports' policies (the pools imported stay).
fn only_policies_changed(old: &FleetFile, new: &FleetFile) -> Result<(), String> {
    // The pools imported (no `imports` section: every pool), in a stable order.
    let pools = |f: &FleetFile| {
        let mut names: Vec<String> = match &f.imports {
            Some(i) => i.iter().map(|imp| imp.pool.clone()).collect(),
            None => f.pools.iter().map(|p| p.name.clone()).collect(),
        };
        names.sort();
        names
    };
    if pools(old) != pools(new) {
        return Err("the pools imported changed".into());
    }
    let strip = |f: &FleetFile| FleetFile {
        imports: None,
        ..f.clone()
    };
    if strip(old) != strip(new) {
        return Err("more than the backend policies changed".into());
    }
    Ok(())
}

/// fleetpick inside this process, on its own Tokio runtime and threads as `fleetpick serve` runs
/// it (so it shares no worker threads with the caller's load generator or simulator), for the
/// demo, the benchmarks and tests that read its fleet directly. Dropping it stops the server:
/// open streams get [`IN_PROCESS_GRACE`] to finish, then the threads are joined.
#[derive(Debug)]
pub struct InProcess {
    /// The ext_proc listener's address.
    pub addr: SocketAddr,
    pub fleet: Arc<Fleet>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a stopping [`InProcess`] waits for open streams. Short: its users stop it when
/// their clients are done (or, in tests, while the client's own connection waits on the very
/// thread that is stopping it, so a longer grace would only be waited out).
pub const IN_PROCESS_GRACE: Duration = Duration::from_millis(200);

impl InProcess {
    /// Starts fleetpick on `cfg`, listening on a free loopback port.
    pub fn start(cfg: FleetConfig) -> std::io::Result<InProcess> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fleetpick")
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let fleet = Arc::new(Fleet::new(&cfg));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let mut grace = stopped.clone();
        let run_fleet = fleet.clone();
        let thread = std::thread::Builder::new()
            .name("fleetpick".into())
            .spawn(move || {
                rt.block_on(async move {
                    let io = Io {
                        grpc: listener,
                        metrics: None,
                        config_file: None,
                    };
                    let served = run(run_fleet, &cfg, io, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    // A client that keeps its connection open must not hold the stop forever.
                    let bounded = async move {
                        let _ = grace.wait_for(|s| *s).await;
                        tokio::time::sleep(IN_PROCESS_GRACE).await;
                    };
                    tokio::select! {
                        result = served => {
                            if let Err(e) = result {
                                tracing::warn!(error = %e, "fleetpick stopped with an error");
                            }
                        }
                        () = bounded => {}
                    }
                });
                rt.shutdown_timeout(IN_PROCESS_GRACE);
            })?;
        Ok(InProcess {
            addr,
            fleet,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The address `serve` should bind: the flag if given, else the fleet file's.
pub fn listen_addr(cfg: &FleetConfig, flag: Option<SocketAddr>) -> SocketAddr {
    flag.unwrap_or(cfg.file.server.listen)
}

/// The address of fleetpick's `/metrics`, if any: the flag if given, else the fleet file's.
pub fn metrics_addr(cfg: &FleetConfig, flag: Option<SocketAddr>) -> Option<SocketAddr> {
    flag.or(cfg.file.server.metrics_listen)
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
    fn only_a_policy_change_may_be_applied_while_running() {
        let base = file("imports: [{pool: p}]\n");
        let drained = file("imports: [{pool: p, policy: {capacity_scaler: 0}}]\n");
        assert!(only_policies_changed(&base, &drained).is_ok());
        let weights = file("imports: [{pool: p}]\nscheduler: {weights: {queue: 5}}\n");
        assert!(
            only_policies_changed(&base, &weights)
                .unwrap_err()
                .contains("more than the backend policies")
        );
        // No imports section imports every pool: the same set.
        assert!(only_policies_changed(&file(""), &drained).is_ok());
        let two = |imports: &str| {
            FleetConfig::parse(
                &format!("clusters: [{{name: a}}]\npools: [{{name: p, models: [m], target_port: 80, endpoints: {{a: [10.0.0.1]}}}}, {{name: q, models: [n], target_port: 80, endpoints: {{a: [10.0.0.2]}}}}]\n{imports}"),
                "t",
            )
            .unwrap()
            .file
        };
        assert!(
            only_policies_changed(&two(""), &two("imports: [{pool: p}]\n"))
                .unwrap_err()
                .contains("pools imported")
        );
    }
}
