//! `fleetpick serve`: puts the parts together. The fleet from the fleet file, one poller task per
//! endpoint, the ext_proc service and gRPC health on one listener, until `shutdown` resolves.
//!
//! Health: `grpc.health.v1` answers for `envoy.service.ext_proc.v3.ExternalProcessor` (and the
//! empty service name): SERVING while at least one endpoint is eligible, NOT_SERVING otherwise,
//! so that Envoy's active health check can fail open when the picker has nothing to offer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::collect::poller;
use crate::config::FleetConfig;
use crate::extproc::{Picker, Settings};
use crate::fleet::Fleet;

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
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let fleet = Arc::new(Fleet::new(&cfg));
    run(fleet, &cfg, listener, shutdown).await
}

/// Serves the picker for `fleet` (built from `cfg`), which the caller may keep watching.
pub async fn run(
    fleet: Arc<Fleet>,
    cfg: &FleetConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let _pollers = poller::spawn(&fleet)?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health_fleet = fleet.clone();
    let health = tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        loop {
            tick.tick().await;
            let status = if health_fleet.eligible_count() > 0 {
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
    let file = &cfg.file;
    let picker = Picker::new(
        fleet,
        Settings {
            weights: file.scheduler.weights,
            fallbacks: file.scheduler.fallbacks,
            max_body_bytes: file.server.max_body_bytes,
            body_mode: file.server.body_mode,
        },
    );
    // Nodelay on the accepted sockets themselves (the builder's setting does not reach a
    // listener we bound): with Nagle's algorithm, small ext_proc answers waited for delayed
    // ACKs and requests stalled about 40 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(picker.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    health.abort();
    Ok(result?)
}

/// The address `serve` should bind: the flag if given, else the fleet file's.
pub fn listen_addr(cfg: &FleetConfig, flag: Option<SocketAddr>) -> SocketAddr {
    flag.unwrap_or(cfg.file.server.listen)
}
