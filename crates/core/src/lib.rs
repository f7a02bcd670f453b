//! fleetpick's decisions, without sockets: what the fleet looks like, how loaded each endpoint
//! is, and which endpoint serves a request. The server feeds it (scraped pages, reloaded fleet
//! files, request bodies) and acts on its answers; nothing here opens a socket or spawns a task.
//!
//! # Layout
//! - [`profile`]: the engines' metric names and the parser of one `/metrics` page into a load
//!   sample.
//! - [`fleet`]: the live fleet: topology, cluster health, each endpoint's scraped load and
//!   in-flight counts; a reload makes the next generation.
//! - [`schedule`]: the cluster tier (health, policy, locality, spill), then the scorers: the
//!   pick; and the saturation detector (free slots).
//! - [`admission`]: what becomes of a request once its pool and priority are known: served,
//!   shed, or queued.
//! - [`queue`]: flow control's queue: priority bands, fair flows, bounds, time to live.
//! - [`prompt`]: the bytes of a request's prompt the picker hashes (its own rendering of a
//!   conversation).
//! - [`prefix`]: the prompt's chained block hashes and the picker's approximate prefix index.
//! - [`session`]: session affinity's bounded memory.
//! - [`rewrite`]: model rewrites: weighted targets, the client's name restored in responses.
//!
//! What may use what: `profile`, `prompt`, `prefix`, `session`, `rewrite`, `admission` and
//! `queue` use nothing else here; `fleet` holds all of them but `prompt` and `admission`;
//! `schedule` reads `fleet`.

pub mod admission;
pub mod fleet;
pub mod prefix;
pub mod profile;
pub mod prompt;
pub mod queue;
pub mod rewrite;
pub mod schedule;
pub mod session;
