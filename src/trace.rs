//! W3C Trace Context (`traceparent`) for the requests fleetpick places: the request's trace is
//! read from its header, fleetpick's pick becomes a span of it, and the request goes upstream
//! carrying a `traceparent` whose parent is that span, so the model server's spans hang under
//! the pick. A request without a valid header starts a new trace (not sampled: fleetpick does
//! not record it unless a tracing backend does), so that its logs and the model server's still
//! share a trace id. `tracestate` is left as the client sent it (fleetpick adds no entry).
//!
//! Parsing follows the W3C rules: version `00` is exactly 55 characters, a later version may
//! be longer (the fields it adds are ignored), `ff` is invalid; ids are lowercase hex and not
//! all zeros.

use std::fmt;

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// One span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// Trace flags; bit 0: sampled.
    pub flags: u8,
}

impl TraceContext {
    /// The context of a `traceparent` value, if it is valid.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let v = value.trim();
        let b = v.as_bytes();
        // ASCII only, so that the slices below fall on character boundaries.
        if !v.is_ascii() || b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_field(&v[0..2])? as u8;
        match version {
            0xff => return None,
            0 if b.len() != 55 => return None,
            _ if b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        let trace_id = hex_field(&v[3..35])?;
        let span_id = hex_field(&v[36..52])? as u64;
        let flags = hex_field(&v[53..55])? as u8;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace (not sampled).
    pub fn root(rng: &mut fastrand::Rng) -> TraceContext {
        TraceContext {
            trace_id: rng.u128(1..),
            span_id: rng.u64(1..),
            flags: 0,
        }
    }

    /// A child span in the same trace, with the same flags.
    pub fn child(&self, rng: &mut fastrand::Rng) -> TraceContext {
        TraceContext {
            span_id: rng.u64(1..),
            ..*self
        }
    }

    /// The span of the request `traceparent` (if any) names as its parent: a child of it, or
    /// the root of a new trace.
    pub fn for_request(traceparent: Option<&str>, rng: &mut fastrand::Rng) -> TraceContext {
        match traceparent.and_then(TraceContext::parse) {
            Some(parent) => parent.child(rng),
            None => TraceContext::root(rng),
        }
    }

    /// The trace id as the header writes it (32 hex digits), for logs.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// The `traceparent` value naming this span as the parent (always version `00`).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// A field of lowercase hex digits (uppercase is invalid in `traceparent`).
fn hex_field(s: &str) -> Option<u128> {
    if s.is_empty() || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_round_trips_and_children_keep_the_trace() {
        let c = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.span_id, 0x00f067aa0ba902b7);
        assert_eq!(c.flags, 1);
        assert_eq!(c.to_string(), EXAMPLE);
        let mut rng = fastrand::Rng::with_seed(7);
        let child = TraceContext::for_request(Some(EXAMPLE), &mut rng);
        assert_eq!((child.trace_id, child.flags), (c.trace_id, 1));
        assert_ne!(child.span_id, c.span_id);
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
        assert_eq!(child.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn invalid_values_start_a_new_unsampled_trace() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902é-01",
        ];
        for v in bad {
            assert_eq!(TraceContext::parse(v), None, "{v}");
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let root = TraceContext::for_request(Some(bad[2]), &mut rng);
        assert_eq!(root.flags, 0);
        assert_ne!(root.trace_id, 0);
        // A later version may carry more fields; the ones fleetpick knows are read.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert_eq!(
            TraceContext::parse(future).map(|c| c.span_id),
            Some(0x00f067aa0ba902b7)
        );
    }
}
