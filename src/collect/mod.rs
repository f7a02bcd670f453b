//! Collecting endpoint load: the metrics poller and the engine profiles.

pub mod poller;
pub mod profile;
