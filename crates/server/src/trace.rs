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

/// The header names. Vendor entries (`tracestate`) that go with a `traceparent` are dropped
/// when fleetpick starts a new trace (they belong to no trace then).
pub use fleetpick_protocol::headers::{TRACEPARENT, TRACESTATE};
/// Trace flags passed on: sampled (bit 0) and random trace id (bit 1).
const KNOWN_FLAGS: u8 = 0x03;

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

    /// A child span in the same trace, with the flags this version defines (sampled, and
    /// Level 2's random trace id); others are cleared, as the W3C text asks.
    pub fn child(&self, rng: &mut fastrand::Rng) -> TraceContext {
        TraceContext {
            span_id: rng.u64(1..),
            flags: self.flags & KNOWN_FLAGS,
            ..*self
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

/// One request's place in its trace, kept for the request's life in fleetpick: with OTLP export
/// (the `otlp` feature, and `OTEL_EXPORTER_OTLP_ENDPOINT` set) it holds the exported span,
/// which ends when this drops.
#[derive(Debug)]
pub struct RequestTrace {
    pub context: TraceContext,
    /// It continues the client's trace (else it is a new one, and the client's `tracestate`,
    /// if any, goes).
    pub continued: bool,
    #[cfg(feature = "otlp")]
    _span: Option<tracing::Span>,
}

impl RequestTrace {
    /// The trace of a request that came with `traceparent` (if any): a child of the span it
    /// names, or the root of a new trace when it names none (or is invalid). With OTLP export
    /// on, the context is the exported span's, whose sampling the tracer decides (parent-based).
    pub fn start(traceparent: Option<&str>, rng: &mut fastrand::Rng) -> RequestTrace {
        let parent = traceparent.and_then(TraceContext::parse);
        #[cfg(feature = "otlp")]
        if otlp::ENABLED.load(std::sync::atomic::Ordering::Relaxed)
            && let Some((span, context)) = otlp::span(parent)
        {
            return RequestTrace {
                context,
                continued: parent.is_some(),
                _span: Some(span),
            };
        }
        RequestTrace {
            context: match parent {
                Some(p) => p.child(rng),
                None => TraceContext::root(rng),
            },
            continued: parent.is_some(),
            #[cfg(feature = "otlp")]
            _span: None,
        }
    }
}

/// OTLP export of fleetpick's request spans (gRPC, the standard `OTEL_EXPORTER_OTLP_*`
/// environment), through `tracing-opentelemetry`: each request is a span named `request`,
/// child of the client's `traceparent`, from the pick to the end of the response.
#[cfg(feature = "otlp")]
pub mod otlp {
    use std::sync::atomic::AtomicBool;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{Filtered, Targets};

    use super::TraceContext;

    /// The spans exported: this module's.
    pub const TARGET: &str = "fleetpick::trace";

    /// Set once the layer is installed: until then a span would have no OTel context.
    pub static ENABLED: AtomicBool = AtomicBool::new(false);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot build the OTLP exporter: {0}")]
    pub struct OtlpError(#[from] opentelemetry_otlp::ExporterBuildError);

    /// Flushes and stops the exporter when dropped (at exit).
    #[derive(Debug)]
    pub struct Guard(SdkTracerProvider);

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Err(e) = self.0.shutdown() {
                eprintln!("fleetpick: OTLP exporter shutdown: {e}");
            }
        }
    }

    /// The tracing layer exporting request spans, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
    /// (else `None`: nothing is exported). Call inside the Tokio runtime (the gRPC client
    /// lives on it), and mark it installed with [`ENABLED`] once the subscriber is set.
    #[allow(clippy::type_complexity)]
    pub fn layer<S>() -> Result<
        Option<(
            Filtered<
                tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
                Targets,
                S,
            >,
            Guard,
        )>,
        OtlpError,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("fleetpick")
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("fleetpick");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target(TARGET, tracing::Level::INFO));
        Ok(Some((layer, Guard(provider))))
    }

    /// A new request span, child of `parent` (a remote span) if any, and its context.
    pub(super) fn span(parent: Option<TraceContext>) -> Option<(tracing::Span, TraceContext)> {
        let span = tracing::info_span!(target: TARGET, "request");
        if let Some(p) = parent {
            let remote = SpanContext::new(
                TraceId::from(p.trace_id),
                SpanId::from(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            );
            let cx = opentelemetry::Context::new().with_remote_span_context(remote);
            span.set_parent(cx).ok()?;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        Some((
            span,
            TraceContext {
                trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
                span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
                flags: sc.trace_flags().to_u8(),
            },
        ))
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
        let started = RequestTrace::start(Some(EXAMPLE), &mut rng);
        assert!(started.continued);
        let child = started.context;
        assert_eq!((child.trace_id, child.flags), (c.trace_id, 1));
        // Flags this version does not define are not passed on.
        let odd = TraceContext::parse(&EXAMPLE.replace("-01", "-ff")).unwrap();
        assert_eq!(odd.child(&mut rng).flags, 0x03);
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
        let started = RequestTrace::start(Some(bad[2]), &mut rng);
        assert!(!started.continued);
        let root = started.context;
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
