//! What fleetpick and Envoy must agree on: how the request body reaches the picker, and the
//! limits and timeouts of Envoy's side that the picker's own settings must fit inside.

use std::fmt;
use std::str::FromStr;

/// Envoy's `message_timeout` on fleetpick's answers (enforced in BUFFERED body mode): a
/// request may not wait in flow control's queue this long there.
pub const MESSAGE_TIMEOUT_MS: u64 = 10_000;
/// The most request-body bytes Envoy holds per request (the route's `request_body_buffer_limit`):
/// for retries, and for fleetpick in BUFFERED body mode. Envoy's default (the listener's 1 MiB
/// connection buffer) is smaller than long-context prompts.
pub const REQUEST_BODY_BUFFER_LIMIT: u64 = 16 * 1024 * 1024;

/// Largest body piece fleetpick sends back in FULL_DUPLEX mode (the ext_proc proto asks for at
/// most 64 KiB per `StreamedBodyResponse`).
pub const MAX_BODY_PIECE: usize = 62_000;

/// How Envoy hands the request body to fleetpick (the filter's `request_body_mode`). The fleet
/// file's `server.body_mode` names it too (`full-duplex` or `buffered`): fleetpick falls back to
/// it when Envoy does not announce the mode in a stream's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BodyMode {
    /// `FULL_DUPLEX_STREAMED`: every body chunk goes to fleetpick and comes back streamed; no size
    /// limit, but `message_timeout` is not enforced and `failure_mode_allow` does not help once
    /// the stream has started.
    FullDuplex,
    /// `BUFFERED`: Envoy buffers the whole body (up to [`REQUEST_BODY_BUFFER_LIMIT`], above which
    /// it answers 413 itself) and sends it in one message; `message_timeout` applies.
    Buffered,
}

// === impl BodyMode ===

impl BodyMode {
    /// Every body mode, in declaration order.
    pub const ALL: [BodyMode; 2] = [BodyMode::FullDuplex, BodyMode::Buffered];

    /// The mode's command-line name (`full-duplex`, `buffered`).
    pub fn as_str(self) -> &'static str {
        match self {
            BodyMode::FullDuplex => "full-duplex",
            BodyMode::Buffered => "buffered",
        }
    }
}

impl fmt::Display for BodyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BodyMode {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BodyMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownName::new("body mode", s, BodyMode::ALL.map(BodyMode::as_str)))
    }
}

/// A flavor or body-mode name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}; expected one of: {expected}")]
pub struct UnknownName {
    what: &'static str,
    got: String,
    expected: String,
}

impl UnknownName {
    pub fn new<const N: usize>(what: &'static str, got: &str, known: [&str; N]) -> UnknownName {
        UnknownName {
            what,
            got: got.to_string(),
            expected: known.join(", "),
        }
    }
}
