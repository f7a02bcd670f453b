//! What a request counts, and when: the request totals once it is answered ([`Tally`]), and,
//! from its pick to the end of its response, the in-flight count at its endpoint and the
//! response's metrics ([`Ledger`]). Both settle as they drop, so every ending of a stream
//! (the response's end, a reset, the client or Envoy gone, a failed handler) counts once.

use std::sync::Arc;
use std::time::Instant;

use fleetpick_core::fleet::{Fleet, InFlight};

use crate::telemetry::Metrics;
use crate::trace::TraceContext;

/// How the metrics name a request.
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    /// The model as the client named it ("" when it named none).
    pub client: String,
    /// The model that serves it, after any rewrite ("" when it named none).
    pub target: String,
    /// Its InferenceObjective ("" when it has none).
    pub objective: String,
}

/// A request's count in `fleetpick_requests_total` (by the client's model, its objective, the
/// cluster that served it and the status), made once. Dropped uncounted, it counts the request
/// as ended without an answer: no cluster, status 0.
#[derive(Debug)]
pub(super) struct Tally {
    metrics: Arc<Metrics>,
    pub names: Names,
    counted: bool,
}

impl Tally {
    pub fn new(metrics: Arc<Metrics>, names: Names) -> Tally {
        Tally {
            metrics,
            names,
            counted: false,
        }
    }

    /// Counts the request as ended in `cluster` ("" when fleetpick answered it) with `status`.
    pub fn count(&mut self, cluster: &str, status: u16) {
        if !std::mem::replace(&mut self.counted, true) {
            let n = &self.names;
            self.metrics
                .request_done(&n.client, &n.objective, cluster, status);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.count("", 0);
    }
}

/// A picked request's books, from the pick to the end of its response: the in-flight count
/// at its endpoint and what the response tells. Dropping it ends the request: counted in the
/// totals, then the in-flight count released.
#[derive(Debug)]
pub(super) struct Ledger {
    metrics: Arc<Metrics>,
    /// The generation of the pick: the guard's endpoint and pool are its indices.
    fleet: Arc<Fleet>,
    tally: Tally,
    guard: InFlight,
    trace: TraceContext,
    picked_at: Instant,
    /// The response's status, once its headers came.
    status: Option<u16>,
    /// The endpoint Envoy reports it served the request from.
    served: Option<String>,
    /// When the response's first byte came (for the time per output token).
    first_token_at: Option<Instant>,
    /// The JSON events of a streamed response (each carries about one token).
    events: u32,
}

impl Ledger {
    pub fn new(fleet: Arc<Fleet>, tally: Tally, guard: InFlight, trace: TraceContext) -> Ledger {
        Ledger {
            metrics: tally.metrics.clone(),
            fleet,
            tally,
            guard,
            trace,
            picked_at: Instant::now(),
            status: None,
            served: None,
            first_token_at: None,
            events: 0,
        }
    }

    pub fn names(&self) -> &Names {
        &self.tally.names
    }

    /// The response headers: its status and the endpoint Envoy says served it.
    pub fn response_headers(&mut self, status: Option<u16>, served: Option<String>) {
        self.status = status;
        if let Some(status) = status.filter(|s| *s >= 400) {
            let n = self.names();
            self.metrics
                .request_failed(&n.client, &n.target, &status.to_string());
        }
        self.served = served;
        self.follow_retry();
    }

    /// When Envoy's retries served the request elsewhere than the primary (walking down the
    /// fallback list), the in-flight count moves to the endpoint actually serving it. It moves
    /// even past an `in-flight` cap: the request is there already, and the count must say so
    /// (the cap bounds fleetpick's picks; a retry is Envoy's choice, made after the pick).
    fn follow_retry(&mut self) {
        let Some(served) = self.served.as_deref() else {
            return;
        };
        if self.guard.endpoint().addr_text == served {
            return;
        }
        if let Some(ep) = self.fleet.endpoints.iter().find(|e| e.addr_text == served) {
            // The new guard is taken before the old one is dropped: one release each.
            self.guard = InFlight::new(ep.clone());
        }
    }

    /// A chunk of the response body went by: the first one with bytes is the first token;
    /// in an event stream, each JSON event is (about) one token.
    pub fn response_body(&mut self, body: &[u8], event_stream: bool) {
        if !body.is_empty() && self.guard.first_token() {
            self.metrics.first_token(
                &self.fleet,
                self.guard.endpoint().pool,
                self.picked_at.elapsed(),
            );
            self.first_token_at = Some(Instant::now());
        }
        if event_stream {
            self.events += body.windows(7).filter(|w| w == b"data: {").count() as u32;
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let endpoint = self.guard.endpoint();
        let cluster = &self.fleet.clusters[endpoint.cluster].name;
        self.tally.count(cluster, self.status.unwrap_or(0));
        if let Some(first) = self.first_token_at
            && self.events >= 2
        {
            self.metrics.time_per_output_token(
                &self.fleet,
                endpoint.pool,
                first.elapsed() / (self.events - 1),
            );
        }
        let n = &self.tally.names;
        self.metrics.request_ended(&n.client, &n.target);
        tracing::debug!(
            model = n.target,
            trace_id = %self.trace.trace_id_hex(),
            endpoint = %endpoint.addr,
            served = self.served.as_deref().unwrap_or(""),
            status = self.status.unwrap_or(0),
            "request ended"
        );
        // The guard drops after this: the in-flight count is released last.
    }
}
