//! `fleetpick serve`: puts the parts together. The fleet from the fleet file, one poller task per
//! endpoint, the ext_proc service and gRPC health on one listener, `/metrics` and the HTTP health
//! endpoints on another, the fleet file's reload, until `shutdown` resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleetpick_config::FleetConfig;
use fleetpick_core::fleet::{Fleet, FleetCell};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::server::TcpIncoming;

use crate::extproc::{Picker, Settings};
use crate::health::Health;
use crate::reload::{ConfigSource, Workers, watch_config};
use crate::telemetry::{self, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the metrics poller's HTTP client: {0}")]
    Poller(#[from] reqwest::Error),
    #[error("the gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Serves the picker for the fleet file `cfg` on `io` until `shutdown` resolves.
pub async fn serve(
    cfg: FleetConfig,
    io: Io,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let fleet = Arc::new(FleetCell::from_pointee(Fleet::new(&cfg)));
    run(fleet, &cfg, io, shutdown).await
}

/// What `serve` talks to: the ext_proc gRPC listener, optionally fleetpick's own Prometheus
/// `/metrics` listener, and optionally the fleet file to watch for changes.
#[derive(Debug)]
pub struct Io {
    pub grpc: TcpListener,
    /// TLS on `grpc` (none: plaintext).
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub metrics: Option<TcpListener>,
    /// The fleet file to re-read every [`crate::reload::RELOAD_EVERY`] and on SIGHUP.
    pub config_file: Option<ConfigSource>,
}

type ServerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + 'a>>;

/// Serves the picker for `fleet` (built from `cfg`), which the caller may keep watching.
pub async fn run(
    fleet: Arc<FleetCell>,
    cfg: &FleetConfig,
    io: Io,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let workers = Workers::start(&fleet.load_full())?;
    let metrics = Arc::new(Metrics::new(&fleet.load()));
    let (health, health_service) = Health::new(fleet.clone());
    // Each stops (aborted) when this function returns: none has anything to finish.
    let _metrics_task = io.metrics.map(|l| {
        let (metrics, fleet, health) = (metrics.clone(), fleet.clone(), health.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            if let Err(e) = telemetry::serve(l, metrics, fleet, health).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        }))
    });
    let _health_task = AbortOnDropHandle::new(tokio::spawn(health.clone().follow()));
    // The watcher owns the workers from here: a reload replaces them.
    let (_workers, _watcher) = match io.config_file {
        Some(source) => {
            let watch = watch_config(source, fleet.clone(), metrics.clone(), workers);
            (None, Some(AbortOnDropHandle::new(tokio::spawn(watch))))
        }
        None => (Some(workers), None),
    };
    let server = &cfg.file.server;
    let grace = Duration::from_millis(server.shutdown_grace_ms);
    let picker = Picker::new(
        fleet,
        Settings {
            max_body_bytes: server.max_body_bytes,
            body_mode: server.body_mode,
        },
        metrics,
    );
    // On the signal: NOT_SERVING at once (Envoy's health check stops sending new requests
    // here), no new connections, open streams go on until they end or the grace runs out.
    let draining = CancellationToken::new();
    let stop = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            health.drain().await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: open streams may finish"
            );
            draining.cancel();
        }
    };
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(picker.into_service());
    let (server, _tls_watch): (ServerFuture<'_>, _) = match io.tls {
        Some(tls) => {
            let watch = AbortOnDropHandle::new(tokio::spawn(tls.clone().watch()));
            let incoming = tls.incoming(io.grpc);
            let server = Box::pin(router.serve_with_incoming_shutdown(incoming, stop));
            (server, Some(watch))
        }
        None => {
            // Nodelay on the accepted sockets themselves (the builder's setting does not reach
            // a listener we bound): with Nagle's algorithm, small ext_proc answers waited for
            // delayed ACKs and requests stalled about 40 ms.
            let incoming = TcpIncoming::from(io.grpc).with_nodelay(Some(true));
            (
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop)),
                None,
            )
        }
    };
    tokio::select! {
        r = server => Ok(r?),
        () = async {
            draining.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace over: streams still open are cut");
            Ok(())
        }
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

/// Resolves on Ctrl-C or SIGTERM: when a command that serves should stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
