//! Whether fleetpick takes requests, and telling it: `grpc.health.v1` on the ext_proc listener
//! (for Envoy's active health check) and the rule `/readyz` shares with it.
//!
//! SERVING while fleetpick is not shutting down and at least one endpoint is eligible, so that
//! an Envoy with a health-checked picker cluster fails open when the picker has nothing to
//! offer; NOT_SERVING at once when shutdown begins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetpick_core::fleet::FleetCell;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthService, HealthServer};
use tonic_health::server::HealthReporter;

/// The gRPC service name Envoy's health check asks about.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// How often health follows the fleet's eligibility.
const HEALTH_EVERY: Duration = Duration::from_millis(100);

/// One server's readiness: shared by gRPC health, `/readyz` and shutdown.
#[derive(Debug, Clone)]
pub struct Health {
    fleet: Arc<FleetCell>,
    /// Set once shutdown begins: NOT_SERVING from then on, while open streams end.
    draining: Arc<AtomicBool>,
    reporter: HealthReporter,
}

impl Health {
    /// The readiness of `fleet`, and the gRPC health service that reports it.
    pub fn new(fleet: Arc<FleetCell>) -> (Health, HealthServer<impl HealthService>) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Health {
            fleet,
            draining: Arc::new(AtomicBool::new(false)),
            reporter,
        };
        (health, service)
    }

    /// Whether fleetpick takes requests now: it is not shutting down and some endpoint is
    /// eligible. The one rule behind gRPC health and `/readyz`.
    pub fn serving(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.fleet.load().eligible_count() > 0
    }

    /// Reports every change of [`Health::serving`] to gRPC health; runs until aborted.
    pub async fn follow(self) {
        let mut last = None;
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        loop {
            tick.tick().await;
            let status = if self.serving() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if last != Some(status) {
                tracing::info!(?status, "ext_proc health");
                self.report(status).await;
                last = Some(status);
            }
        }
    }

    /// Shutdown begins: NOT_SERVING at once, and from now on.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.report(ServingStatus::NotServing).await;
    }

    async fn report(&self, status: ServingStatus) {
        self.reporter
            .set_service_status(EXT_PROC_SERVICE, status)
            .await;
        self.reporter.set_service_status("", status).await;
    }
}
