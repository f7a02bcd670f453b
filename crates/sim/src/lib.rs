//! The model-server simulator: many vLLM-like (or SGLang-like) servers in one process, whose
//! latency, queues and KV cache respond to load and to prefix reuse, so the picker can be tested,
//! demonstrated and measured on one small machine.
//!
//! # Layout
//! - [`params`]: the engine constants (documented defaults) and the YAML config file that sets
//!   them per cluster and per server.
//! - [`tokenize`]: the simulator's own tokenizer rule (pieces of text to token ids).
//! - [`template`]: its own chat template: a request's input to each sequence's token ids.
//! - [`kv`]: KV-cache blocks and the automatic prefix cache (chained block hashes, LRU eviction).
//! - [`stats`]: what an engine counts and measures (counters, histograms, live gauges).
//! - [`engine`]: the scheduler, step by step, in virtual time (continuous batching, chunked
//!   prefill, preemption, LoRA slots). No I/O: unit tests drive it directly.
//! - [`metrics`]: an engine's stats rendered as a vLLM or SGLang `/metrics` page.
//! - [`server`]: one server's OpenAI-compatible HTTP API, the task that runs its engine in
//!   scaled real time, its injected faults, stop and start.
//! - [`fleet`]: N servers over named clusters, the ready file, and the admin API for faults.
//!
//! What may use what (no cycles, tests included): `params`, `tokenize`, `kv` and `stats` use
//! nothing else here; `template` uses `tokenize`; `engine` uses `params`, `kv` and `stats`;
//! `metrics` uses `params` and `stats`; `server` uses all of the above; `fleet` uses `params`
//! and `server`.

pub mod engine;
pub mod fleet;
pub mod kv;
pub mod metrics;
pub mod params;
pub mod server;
pub mod stats;
pub mod template;
pub mod tokenize;

pub use fleet::{Fleet, FleetOptions, ReadyEntry, SimError};
pub use server::{CLUSTER_HEADER, SERVER_HEADER};
