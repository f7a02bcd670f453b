//! fleetpick: an Envoy external processor that picks, for every LLM inference request, the
//! model-server endpoint that will serve it best, across clusters and regions.
//!
//! # Layout
//! - [`openai`]: OpenAI-style request bodies (one parse per request) and the error shape.
//! - [`sim`]: the model-server simulator (engine model, OpenAI API, `/metrics`, faults) that
//!   every test, demo and benchmark runs on.
//! - [`loadgen`]: a load generator that records, per request, start, first token, end, status
//!   and the server that answered.
//! - [`demo`]: the newcomer's demo.

pub mod demo;
pub mod loadgen;
pub mod openai;
pub mod sim;
