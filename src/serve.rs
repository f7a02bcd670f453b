//! `fleetpick serve`: puts the parts together. The fleet from the fleet file, one poller task per
//! endpoint, the ext_proc service and gRPC health on one listener, until `shutdown` resolves.
//!
//! Reload: the fleet file is re-read every [`RELOAD_EVERY`] and on SIGHUP. A valid change
//! becomes the fleet's next generation ([`Fleet::successor`]): new streams take it, open ones
//! finish on the one they started with, and endpoints that stay keep their load and in-flight
//! counts. Pollers and flow-control dispatchers are restarted for it. A file that does not
//! validate, or that changes the `server` section (listeners, body mode, TLS: they need a
//! restart), is refused with a logged reason and the last good fleet stays.
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
use crate::config::{ConfigError, FleetConfig, FleetFile};
use crate::extproc::{Picker, Settings};
use crate::fleet::{Fleet, FleetCell};
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
    let fleet = Arc::new(FleetCell::from_pointee(Fleet::new(&cfg)));
    run(fleet, &cfg, io, shutdown).await
}

/// What `serve` talks to: the ext_proc gRPC listener, optionally fleetpick's own Prometheus
/// `/metrics` listener, and optionally the fleet file to watch for policy changes.
#[derive(Debug)]
pub struct Io {
    pub grpc: TcpListener,
    /// TLS on `grpc` (none: plaintext).
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub metrics: Option<TcpListener>,
    /// The fleet file to re-read every [`RELOAD_EVERY`] and on SIGHUP.
    pub config_file: Option<ConfigSource>,
}

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
struct Workers {
    _pollers: tokio::task::JoinSet<()>,
    _dispatchers: tokio::task::JoinSet<()>,
}

impl Workers {
    fn start(fleet: &Arc<Fleet>) -> Result<Workers, reqwest::Error> {
        Ok(Workers {
            _pollers: poller::spawn(fleet)?,
            _dispatchers: crate::flow::spawn_dispatchers(fleet),
        })
    }
}

/// How often the fleet file is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Whether fleetpick takes requests: it is not shutting down and some endpoint is eligible. The
/// one rule behind gRPC health and `/readyz`.
pub fn serving(fleet: &Fleet, draining: &AtomicBool) -> bool {
    !draining.load(Ordering::Relaxed) && fleet.eligible_count() > 0
}

/// Serves the picker for `fleet` (built from `cfg`), which the caller may keep watching.
pub async fn run(
    fleet: Arc<FleetCell>,
    cfg: &FleetConfig,
    io: Io,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let workers = Workers::start(&fleet.load_full())?;
    let metrics = Arc::new(Metrics::new(&fleet.load()));
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
            let status = if serving(&health_fleet.load(), &health_draining) {
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
    // The watcher owns the workers from here: a reload replaces them.
    let (_workers, watcher) = match io.config_file {
        Some(source) => {
            let watch = watch_config(source, fleet.clone(), metrics.clone(), workers);
            (None, Some(AbortOnDrop(tokio::spawn(watch))))
        }
        None => (Some(workers), None),
    };
    let file = &cfg.file;
    let grace = Duration::from_millis(file.server.shutdown_grace_ms);
    let picker = Picker::new(
        fleet,
        Settings {
            max_body_bytes: file.server.max_body_bytes,
            body_mode: file.server.body_mode,
        },
        metrics,
    );
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
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(picker.into_service());
    let (server, _tls_watch) = match io.tls {
        Some(tls) => {
            let watch = AbortOnDrop(tokio::spawn(tls.clone().watch()));
            let incoming = tls.incoming(io.grpc);
            let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop));
            (server, Some(watch))
        }
        None => {
            // Nodelay on the accepted sockets themselves (the builder's setting does not reach
            // a listener we bound): with Nagle's algorithm, small ext_proc answers waited for
            // delayed ACKs and requests stalled about 40 ms.
            let incoming = TcpIncoming::from(io.grpc).with_nodelay(Some(true));
            let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop));
            (server, None)
        }
    };
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

/// Re-reads the fleet file every [`RELOAD_EVERY`] and on SIGHUP, and applies a valid change as
/// the fleet's next generation (see the module's docs). Contents are compared, not bytes or
/// times, so a change made between the first load and the first re-read is not missed, and a
/// change to a manifest the file names counts too. A refusal is logged and counted once per
/// reason (again on SIGHUP), not every second.
async fn watch_config(
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

/// fleetpick inside this process, on its own Tokio runtime and threads as `fleetpick serve` runs
/// it (so it shares no worker threads with the caller's load generator or simulator), for the
/// demo, the benchmarks and tests that read its fleet directly. Dropping it stops the server:
/// open streams get [`IN_PROCESS_GRACE`] to finish, then the threads are joined.
#[derive(Debug)]
pub struct InProcess {
    /// The ext_proc listener's address.
    pub addr: SocketAddr,
    /// The fleet it serves (it does not watch a file: this stays its only generation).
    pub fleet: Arc<Fleet>,
    /// Its `/metrics` listener, when started with one.
    pub metrics: Option<SocketAddr>,
    /// Its threads (Linux tids), for [`InProcess::cpu_seconds`].
    threads: Arc<std::sync::Mutex<Vec<u32>>>,
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
        InProcess::launch(cfg, false)
    }

    /// [`InProcess::start`], with a `/metrics` listener on another free loopback port.
    pub fn start_with_metrics(cfg: FleetConfig) -> std::io::Result<InProcess> {
        InProcess::launch(cfg, true)
    }

    /// CPU seconds its threads have used (those still running: a Tokio blocking thread that
    /// exited takes its time along, and fleetpick hardly uses any); `None` without `/proc`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let times: Vec<f64> = threads
            .iter()
            .filter_map(|&t| crate::cpu::thread_cpu_seconds(t))
            .collect();
        (!times.is_empty()).then(|| times.iter().sum())
    }

    fn launch(cfg: FleetConfig, metrics: bool) -> std::io::Result<InProcess> {
        let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = threads.clone();
        let record_thread = move || {
            if let Some(tid) = crate::cpu::current_thread_id() {
                record.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fleetpick")
            .on_thread_start(record_thread.clone())
            .enable_all()
            .build()?;
        let bind = || -> std::io::Result<(TcpListener, SocketAddr)> {
            let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            std_listener.set_nonblocking(true)?;
            let addr = std_listener.local_addr()?;
            let _guard = rt.enter();
            Ok((TcpListener::from_std(std_listener)?, addr))
        };
        let (listener, addr) = bind()?;
        let (metrics_listener, metrics) = match metrics {
            true => {
                let (l, a) = bind()?;
                (Some(l), Some(a))
            }
            false => (None, None),
        };
        let fleet = Arc::new(Fleet::new(&cfg));
        let cell = Arc::new(FleetCell::new(fleet.clone()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let mut grace = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("fleetpick".into())
            .spawn(move || {
                record_thread();
                rt.block_on(async move {
                    let io = Io {
                        grpc: listener,
                        tls: None,
                        metrics: metrics_listener,
                        config_file: None,
                    };
                    let served = run(cell, &cfg, io, async move {
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
            metrics,
            threads,
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
