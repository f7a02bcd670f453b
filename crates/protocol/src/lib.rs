//! The names and shapes fleetpick shares with the world around it and with its own lab: the
//! leaf crate of the workspace, depended on by the picker, the simulator, the load generator and
//! the Envoy configurations, and depending on none of them.
//!
//! # Layout
//! - [`headers`]: header and metadata names: the Endpoint Picker Protocol's (destination,
//!   subset hint, served endpoint, objective, fairness), W3C trace context, fleetpick's reason
//!   header, the simulator's response headers.
//! - [`envoy`]: what fleetpick and Envoy must agree on: body modes, Envoy's limits and timeouts.
//! - [`engine`]: the model-server engines fleetpick knows by their metric names.
//! - [`openai`]: the OpenAI-compatible wire format: which API a path names, request bodies read
//!   in one parse, and the error shape.

pub mod engine;
pub mod envoy;
pub mod headers;
pub mod openai;

pub use engine::EngineKind;
pub use envoy::{BodyMode, UnknownName};
