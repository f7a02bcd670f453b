//! fleetpick's integration tests, as one test binary: gRPC tests of the ext_proc service,
//! end-to-end tests through the real Envoy (one picker, many clusters, flow control, affinity,
//! lifecycle, TLS, traces), the simulator, the benchmark harness's smoke scenario, the shipped
//! files. Helpers are the `fleetpick-tests` library (`tests/src`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod affinity;
mod bench;
mod cli;
mod e2e;
mod envoy_config;
mod extproc;
mod flow;
mod layout;
mod lifecycle;
mod multicluster;
#[cfg(feature = "otlp")]
mod otlp;
mod packaging;
mod profile;
mod sim;
mod tls;
