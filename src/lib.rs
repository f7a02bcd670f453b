//! fleetpick: an Envoy external processor that picks, for every LLM inference request, the
//! model-server endpoint that will serve it best, across clusters and regions.
//!
//! # Layout
//! - [`config`]: the fleet file (the picker's region, clusters, pools, imports with backend
//!   policies, weights, poller), validated once.
//! - [`fleet`]: the live fleet: topology, cluster health, each endpoint's scraped load, round
//!   trip and in-flight count.
//! - [`collect`]: the metrics poller and the engine profiles (metric names per engine).
//! - [`schedule`]: the cluster tier (health, policy, locality, spill) then the endpoint tier
//!   (scorers): which endpoint serves a request.
//! - [`extproc`]: the Envoy `ExternalProcessor` service (the Endpoint Picker Protocol).
//! - [`flow`]: flow control's queues (priority bands, fair flows, bounds, time to live).
//! - [`serve`]: `fleetpick serve`, wiring the above with gRPC health, and the fleet file's
//!   reload.
//! - [`trace`]: W3C `traceparent`: the pick as a span of the request's trace, passed upstream.
//! - [`tls`]: TLS and mutual TLS on the ext_proc listener, certificates re-read on change.
//! - [`telemetry`]: fleetpick's own Prometheus metrics (picks, dry-run verdicts, refusals,
//!   cluster health, in-flight counts).
//! - [`envoy`]: the Envoy configurations fleetpick ships and tests with.
//! - [`openai`]: OpenAI-style request bodies (one parse per request) and the error shape.
//! - [`prefix`]: chained block hashes of prompts and the picker's approximate index of which
//!   endpoint holds which prefix.
//! - [`rewrite`]: model rewrites (client-facing names served as weighted targets) and the
//!   restoring of the client's name in responses.
//! - [`session`]: session affinity's bounded memory of which endpoint serves each session.
//! - [`cpu`]: CPU time of processes and threads, from `/proc`.
//! - [`scratch`]: scratch directories removed on drop.
//! - [`sim`]: the model-server simulator (engine model, OpenAI API, `/metrics`, faults) that
//!   every test, demo and benchmark runs on.
//! - [`loadgen`]: a load generator that records, per request, start, first token, end, status
//!   and the server that answered.
//! - [`bench`]: the benchmark harness: scenarios run through every routing strategy behind the
//!   real Envoy, results and reports.
//! - [`demo`]: the newcomer's demo.

pub mod bench;
pub mod collect;
pub mod config;
pub mod cpu;
pub mod demo;
pub mod envoy;
pub mod extproc;
pub mod fleet;
pub mod flow;
pub mod loadgen;
pub mod openai;
pub mod prefix;
pub mod rewrite;
pub mod schedule;
pub mod scratch;
pub mod serve;
pub mod session;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod trace;
