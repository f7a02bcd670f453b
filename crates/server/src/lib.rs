//! fleetpick, the shipped picker: an Envoy external processor that picks, for every LLM
//! inference request, the model-server endpoint that will serve it best, across clusters and
//! regions. This crate is the server around the decisions of `fleetpick-core`: sockets, tasks,
//! signals, and what Envoy and Prometheus see.
//!
//! # Layout
//! - [`extproc`]: the Envoy `ExternalProcessor` service (the Endpoint Picker Protocol), one
//!   stream per request, each a state machine.
//! - [`poller`]: one task per endpoint scraping its `/metrics` into the fleet.
//! - [`dispatch`]: flow control's dispatchers, releasing queued requests as capacity frees.
//! - [`reload`]: the fleet file re-read (every second, on SIGHUP) into the next generation.
//! - [`health`]: gRPC health and the readiness rule `/readyz` shares.
//! - [`telemetry`]: fleetpick's own Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`tls`]: TLS and mutual TLS on the ext_proc listener, certificates re-read on change.
//! - [`trace`]: W3C `traceparent`: the pick as a span of the request's trace; OTLP export
//!   (feature `otlp`).
//! - [`logs`]: log output (human or JSON) and, with `otlp`, span export.
//! - [`serve`]: `fleetpick serve`, putting the above together until shutdown.
//! - [`in_process`]: fleetpick on its own runtime inside another process (demo, benchmarks,
//!   tests).
//!
//! What may use what: `serve` uses everything; `in_process` uses `serve`; `reload` uses
//! `poller`, `dispatch` and `telemetry`; `telemetry` uses `health`; `extproc` uses
//! `telemetry` and `trace`. None of them uses `serve` or `in_process`.

pub mod dispatch;
pub mod extproc;
pub mod health;
pub mod in_process;
pub mod logs;
pub mod poller;
pub mod reload;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod trace;

pub use in_process::InProcess;
