//! fleetpick's lab: what runs the picker against a simulated fleet and measures it. Nothing in
//! the shipped picker depends on this crate.
//!
//! # Layout
//! - [`bench`](mod@bench): the benchmark harness: scenarios run through every routing strategy behind the
//!   real Envoy ([`bench::report`]: results and the Markdown report; [`bench::plot`]: its charts).
//! - [`demo`]: the newcomer's demo: Envoy, fleetpick and a simulated fleet of three clusters in
//!   two regions, shown live.
//!
//! The `fleetpick-lab` command (`src/main.rs`) runs these, the simulator (`fleetpick-sim`) and
//! the load generator (`fleetpick-loadgen`).

pub mod bench;
pub mod demo;
