//! The service's shared state: the fleet's current generation, the `server` settings and the
//! metrics, which every stream reads.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use fleetpick_config::BodyMode;
use fleetpick_core::fleet::FleetCell;

use crate::telemetry::Metrics;

/// What the service needs besides the fleet: the `server` section, fixed for the process's life.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub body_mode: BodyMode,
}

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct Picker {
    /// The current generation; each request is picked in the one current when its body ends.
    pub(super) fleet: Arc<FleetCell>,
    pub(super) settings: Arc<Settings>,
    pub(super) metrics: Arc<Metrics>,
}

impl Picker {
    pub fn new(fleet: Arc<FleetCell>, settings: Settings, metrics: Arc<Metrics>) -> Picker {
        Picker {
            fleet,
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// The tonic service, with message limits that fit the body limit.
    pub fn into_service(self) -> ExternalProcessorServer<Picker> {
        // A BUFFERED body arrives in one message, up to Envoy's buffer limit: decode it whole
        // so that an oversized body gets fleetpick's 413, not a broken stream. Leave room for
        // the envelope.
        let limit = self
            .settings
            .max_body_bytes
            .max(fleetpick_protocol::envoy::REQUEST_BODY_BUFFER_LIMIT as usize)
            .saturating_add(64 * 1024);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}
