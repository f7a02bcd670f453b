//! The `ExternalProcessor` gRPC service: one stream per HTTP request, speaking the Endpoint
//! Picker Protocol to Envoy.
//!
//! # The stream, message by message
//! - `request_headers`: note `:path`, the subset hint and the body mode Envoy announces
//!   (`protocol_config`, else the fleet file's `server.body_mode`). A request without a body is
//!   picked at once. In BUFFERED mode the headers are let through (Envoy will not send the body
//!   before they are answered); in FULL_DUPLEX mode the answer waits for the body.
//! - `request_body` chunks: collected (over `max_body_bytes`: 413). On end of stream the body is
//!   parsed once, the endpoint picked, and the answer goes out: FULL_DUPLEX sends the headers
//!   response (destination header + `envoy.lb` metadata) and then the body back as
//!   `StreamedBodyResponse` pieces of at most 62,000 bytes, end of stream on the last and only
//!   there; BUFFERED sends one body response carrying the header mutation and metadata.
//! - Admission, once the model (and so the pool) is known: the request's priority comes from
//!   its InferenceObjective. While the pool is saturated a sheddable one (priority below 0) is
//!   refused with 429; with flow control the others wait in the pool's queue (see
//!   [`fleetpick_core::queue`]) and the stream's task awaits the release while it keeps reading the
//!   stream (its end means the client left, and the request leaves the queue).
//! - Errors become immediate responses in the OpenAI error shape: 400 (bad body), 404 (unknown
//!   model), 413 (too large), 429 (shed, queue full, at capacity), 503 (no eligible endpoint,
//!   waited past the queue's time to live).
//! - `response_headers`: the status and the endpoint Envoy says it served are noted.
//! - `response_body` chunks (the shipped Envoy configs stream them, FULL_DUPLEX): echoed back
//!   unchanged; the one with end of stream (or the response trailers) ends the request.
//!
//! The picked endpoint's in-flight count is held by an [`InFlight`] guard owned by the stream's
//! state. It is released once: at the end of the response, or when the stream's task ends,
//! which every other ending (reset, client gone, Envoy gone) leads to.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::telemetry::FlowOutcome;
use crate::telemetry::Metrics;
use crate::trace::{RequestTrace, TRACEPARENT, TRACESTATE};
use fleetpick_config::BodyMode;
use fleetpick_core::admission::{self, Admission, Ask, Flow, NoRoom, PickMode};
use fleetpick_core::fleet::{Fleet, FleetCell, InFlight};
use fleetpick_core::queue::{FlowQueue, Outcome, Ticket};
use fleetpick_core::rewrite::Restorer;
use fleetpick_core::schedule::Tier;
use fleetpick_core::schedule::{self, PickError, PickRequest};
use fleetpick_core::session::{SessionKey, cookie_value, endpoint_token};
use fleetpick_protocol::openai::{Api, InferenceRequest};
use refusal::Refusal;

pub use fleetpick_protocol::envoy::MAX_BODY_PIECE as MAX_PIECE;
pub use fleetpick_protocol::headers::{
    DESTINATION_HEADER, FAIRNESS_HEADER, LB_NAMESPACE, OBJECTIVE_HEADER, REASON_HEADER, SERVED_KEY,
    SUBSET_KEY, SUBSET_NAMESPACE,
};

mod refusal;

/// Picks made for one request when concurrent picks keep filling the chosen endpoint to its
/// in-flight cap first (each lost race leaves that endpoint full, so the next pick avoids it).
const PICK_ATTEMPTS: usize = 8;

/// What the service needs besides the fleet: the `server` section, fixed for the process's life.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub body_mode: BodyMode,
}

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct Picker {
    /// The current generation; each stream takes the one current at its start.
    fleet: Arc<FleetCell>,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
}

impl Picker {
    pub fn new(fleet: Arc<FleetCell>, settings: Settings, metrics: Arc<Metrics>) -> Picker {
        Picker {
            fleet,
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// The tonic service, with message limits that fit the body limit.
    pub fn into_service(self) -> ExternalProcessorServer<Picker> {
        // A BUFFERED body arrives in one message, up to Envoy's buffer limit: decode it whole
        // so that an oversized body gets fleetpick's 413, not a broken stream. Leave room for
        // the envelope.
        let limit = self
            .settings
            .max_body_bytes
            .max(fleetpick_protocol::envoy::REQUEST_BODY_BUFFER_LIMIT as usize)
            .saturating_add(64 * 1024);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut stream = StreamState::new(self.clone());
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    // Envoy closed its side: the HTTP stream is over.
                    Ok(None) => break,
                    Err(status) => {
                        if !stream.answered {
                            // A message we could not read before the pick (too large, garbled):
                            // closing with OK would let Envoy go on without a destination, so
                            // fail the stream instead.
                            tracing::warn!(%status, "cannot read an ext_proc message");
                            let _ = tx.send(Err(status)).await;
                        } else {
                            // Reset: normal at the end of a stream, or the client or Envoy left.
                            tracing::trace!(%status, "ext_proc stream ended by the proxy");
                        }
                        break;
                    }
                };
                let mut msgs = std::collections::VecDeque::from([msg]);
                while let Some(msg) = msgs.pop_front() {
                    // A bug must fail this request, not close the stream with OK (which Envoy
                    // reads as "go on without a pick") or take the service down.
                    let Some(out) = guarded(|| stream.handle(msg)) else {
                        let _ = tx.send(Err(internal())).await;
                        return;
                    };
                    if !send_all(&tx, out).await {
                        return;
                    }
                    let Some(mut queued) = stream.queued.take() else {
                        continue;
                    };
                    // Held by flow control: wait for the release, and keep reading the stream,
                    // whose end means the client (or Envoy) left; the ticket then leaves the
                    // queue as it drops. Messages meanwhile are handled after the release.
                    let outcome = loop {
                        tokio::select! {
                            outcome = queued.ticket.wait() => break Some(outcome),
                            next = inbound.message() => match next {
                                Ok(Some(m)) => msgs.push_back(m),
                                Ok(None) => break None,
                                // Not answered yet: closing with OK would let Envoy go on
                                // without a destination.
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    break None;
                                }
                            },
                        }
                    };
                    let Some(outcome) = outcome else {
                        stream.cancelled(queued);
                        return;
                    };
                    let Some(out) = guarded(|| stream.resume(queued, outcome)) else {
                        let _ = tx.send(Err(internal())).await;
                        return;
                    };
                    if !send_all(&tx, out).await {
                        return;
                    }
                }
                if stream.closed {
                    break;
                }
            }
            // `stream` drops here, and with it the in-flight guard.
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends `out` to Envoy in order; false when the stream is gone.
async fn send_all(
    tx: &mpsc::Sender<Result<ProcessingResponse, Status>>,
    out: Vec<ProcessingResponse>,
) -> bool {
    for r in out {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

/// Runs `f`, turning a panic into `None` (logged): the request fails, the service stays up.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::error!("ext_proc stream handler panicked; failing the request");
            None
        }
    }
}

fn internal() -> Status {
    Status::internal("fleetpick failed on this request")
}

/// One ext_proc stream's state.
#[derive(Debug)]
struct StreamState {
    picker: Picker,
    /// The fleet's generation at the stream's start, used to its end: the indices a pick
    /// leaves (pool, endpoint) mean the same thing throughout, however a reload goes.
    fleet: Arc<Fleet>,
    mode: BodyMode,
    path: String,
    subset: Option<Vec<SocketAddr>>,
    body: Vec<u8>,
    /// The request phase is answered (picked or refused).
    answered: bool,
    /// An immediate response was sent: nothing more to do.
    closed: bool,
    response_streamed: bool,
    model: Option<String>,
    in_flight: Option<InFlight>,
    status: Option<u16>,
    served: Option<String>,
    /// The request's headers, kept for what the pool decides to read once the model is known
    /// (the session key).
    request_headers: Option<HttpHeaders>,
    /// Restores the client's model name in the response of a rewritten request.
    restore: Option<Restorer>,
    /// A new session cookie, set on the response.
    set_cookie: Option<String>,
    /// Waiting in flow control's queue.
    queued: Option<Queued>,
    /// Request trailers came while the request waited: answered after the release.
    trailers_pending: bool,
    /// The model the client named (before any rewrite), for metrics.
    client_model: Option<String>,
    /// When the pick was made (for the time to first token).
    picked_at: std::time::Instant,
    /// When the response's first byte came (for the time per output token).
    first_token_at: Option<std::time::Instant>,
    /// The response is an event stream, and how many JSON events it has carried.
    event_stream: bool,
    events: u32,
    /// The pick's span in the request's trace (see [`crate::trace`]); ends as it drops.
    trace: Option<RequestTrace>,
    /// The request's InferenceObjective, by name, for metrics.
    objective: Option<String>,
    /// The status of fleetpick's own answer, when it refused the request.
    refused_status: Option<u16>,
    /// Counted in the request totals (once, however it ended).
    counted: bool,
}

/// What a request needs to be picked, kept while it waits in the queue.
#[derive(Debug)]
struct Pending {
    model: Option<String>,
    pool: Option<usize>,
    hashes: Vec<u64>,
    session_key: Option<String>,
    priority: i32,
    /// The fairness key: `x-gateway-inference-fairness-id`, else the objective's name.
    flow: String,
    has_body: bool,
    body_end: bool,
}

/// What a pick found: the endpoint (its in-flight count taken), or no room in the pool.
#[derive(Debug)]
enum Placed {
    Picked(schedule::Pick, InFlight),
    NoRoom(NoRoom),
}

#[derive(Debug)]
struct Queued {
    ticket: Ticket,
    pending: Pending,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.finish();
    }
}

impl StreamState {
    fn new(picker: Picker) -> StreamState {
        StreamState {
            mode: picker.settings.body_mode,
            fleet: picker.fleet.load_full(),
            picker,
            path: String::new(),
            subset: None,
            body: Vec::new(),
            answered: false,
            closed: false,
            response_streamed: false,
            model: None,
            in_flight: None,
            status: None,
            served: None,
            request_headers: None,
            restore: None,
            set_cookie: None,
            queued: None,
            trailers_pending: false,
            client_model: None,
            picked_at: std::time::Instant::now(),
            first_token_at: None,
            event_stream: false,
            events: 0,
            trace: None,
            objective: None,
            refused_status: None,
            counted: false,
        }
    }

    /// The request is over (response complete, or the stream ended): release its in-flight count.
    /// Idempotent; the guard is taken, so the release happens once.
    fn finish(&mut self) {
        if self.answered && !std::mem::replace(&mut self.counted, true) {
            let cluster = self.in_flight.as_ref().map_or("", |g| {
                self.fleet.clusters[g.endpoint().cluster].name.as_str()
            });
            self.picker.metrics.request_done(
                self.client_model.as_deref().unwrap_or(""),
                self.objective.as_deref().unwrap_or(""),
                cluster,
                self.refused_status.or(self.status).unwrap_or(0),
            );
        }
        if let Some(guard) = self.in_flight.take() {
            if let Some(first) = self.first_token_at
                && self.events >= 2
            {
                self.picker.metrics.time_per_output_token(
                    &self.fleet,
                    guard.endpoint().pool,
                    first.elapsed() / (self.events - 1),
                );
            }
            let target = self.model.as_deref().unwrap_or("");
            self.picker
                .metrics
                .request_ended(self.client_model.as_deref().unwrap_or(target), target);
            tracing::debug!(
                model = self.model.as_deref().unwrap_or(""),
                trace_id = %self.trace.as_ref().map(|t| t.context.trace_id_hex()).unwrap_or_default(),
                endpoint = %guard.endpoint().addr,
                served = self.served.as_deref().unwrap_or(""),
                status = self.status.unwrap_or(0),
                "request ended"
            );
        }
    }

    /// When Envoy's retries served the request elsewhere than the primary (walking down the
    /// fallback list), the in-flight count moves to the endpoint actually serving it. It moves
    /// even past an `in-flight` cap: the request is there already, and the count must say so
    /// (the cap bounds fleetpick's picks; a retry is Envoy's choice, made after the pick).
    fn follow_retry(&mut self) {
        let (Some(served), Some(guard)) = (self.served.as_deref(), self.in_flight.as_ref()) else {
            return;
        };
        if guard.endpoint().addr_text == served {
            return;
        }
        if let Some(ep) = self.fleet.endpoints.iter().find(|e| e.addr_text == served) {
            // The new guard is taken before the old one is dropped: one release each.
            self.in_flight = Some(InFlight::new(ep.clone()));
        }
    }

    fn handle(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            if pc.request_body_mode == BodySendMode::Buffered as i32 {
                self.mode = BodyMode::Buffered;
            } else if pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32 {
                self.mode = BodyMode::FullDuplex;
            }
            self.response_streamed =
                pc.response_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        match msg.request {
            Some(Req::RequestHeaders(h)) => {
                self.path = header(&h, ":path").unwrap_or_default();
                self.subset = subset_hint(msg.metadata_context.as_ref());
                let end = h.end_of_stream;
                self.request_headers = Some(h);
                if end {
                    return self.answer(false);
                }
                match self.mode {
                    BodyMode::Buffered => vec![headers_response(Resp::RequestHeaders, None)],
                    BodyMode::FullDuplex => Vec::new(),
                }
            }
            Some(Req::RequestBody(b)) => {
                if self.answered {
                    return Vec::new();
                }
                if self.body.len() + b.body.len() > self.picker.settings.max_body_bytes {
                    let limit = self.picker.settings.max_body_bytes;
                    return self.refuse(Refusal::TooLarge { limit });
                }
                if self.body.is_empty() {
                    self.body = b.body;
                } else {
                    self.body.extend_from_slice(&b.body);
                }
                // In BUFFERED mode the body comes whole in one message, without end of stream
                // when trailers follow: answer it either way.
                if b.end_of_stream || self.mode == BodyMode::Buffered {
                    return self.answer(b.end_of_stream);
                }
                Vec::new()
            }
            Some(Req::RequestTrailers(_)) => {
                let mut out = if self.answered {
                    Vec::new()
                } else {
                    self.answer(false)
                };
                if self.queued.is_some() {
                    // The headers response must go first: the trailers are answered after the
                    // release (see `resume`).
                    self.trailers_pending = true;
                } else if !self.closed {
                    out.push(trailers_response());
                }
                out
            }
            Some(Req::ResponseHeaders(h)) => {
                self.status = header(&h, ":status").and_then(|s| s.parse().ok());
                self.event_stream = header(&h, "content-type")
                    .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/event-stream"));
                if let Some(status) = self.status.filter(|s| *s >= 400) {
                    let target = self.model.as_deref().unwrap_or("");
                    self.picker.metrics.request_failed(
                        self.client_model.as_deref().unwrap_or(target),
                        target,
                        &status.to_string(),
                    );
                }
                self.served = served_endpoint(msg.metadata_context.as_ref());
                self.follow_retry();
                let mut mutation = HeaderMutation::default();
                if let Some(cookie) = self.set_cookie.take() {
                    mutation.set_headers.push(HeaderValueOption {
                        append_action: HeaderAppendAction::AppendIfExistsOrAdd as i32,
                        ..set_header("set-cookie", &cookie)
                    });
                }
                if !self.response_streamed {
                    // Restoring needs the body streamed through here (the shipped configs do).
                    self.restore = None;
                }
                if let Some(r) = self.restore.as_mut() {
                    r.content_type(
                        header(&h, "content-type").as_deref(),
                        header(&h, "content-encoding").as_deref(),
                    );
                    // The restored name may differ in length from the target's.
                    mutation.remove_headers.push("content-length".into());
                }
                let changed =
                    !(mutation.set_headers.is_empty() && mutation.remove_headers.is_empty());
                vec![headers_response(
                    Resp::ResponseHeaders,
                    changed.then_some(mutation),
                )]
            }
            Some(Req::ResponseBody(b)) => {
                if !b.body.is_empty()
                    && let Some(guard) = self.in_flight.as_mut()
                    && guard.first_token()
                {
                    self.picker.metrics.first_token(
                        &self.fleet,
                        guard.endpoint().pool,
                        self.picked_at.elapsed(),
                    );
                    self.first_token_at = Some(std::time::Instant::now());
                }
                if self.event_stream {
                    // Each JSON event of an OpenAI stream carries (about) one token.
                    self.events += b.body.windows(7).filter(|w| w == b"data: {").count() as u32;
                }
                if b.end_of_stream {
                    self.finish();
                }
                let response = match self.restore.as_mut() {
                    // Held until a whole line (events) or the whole body (JSON) is in; nothing
                    // to send for this chunk yet. Full-duplex streaming allows that: the pieces
                    // sent need not match the chunks received one for one.
                    Some(r) => {
                        let out = r.push(&b.body, b.end_of_stream);
                        if out.is_empty() && !b.end_of_stream {
                            return Vec::new();
                        }
                        streamed_piece(out, b.end_of_stream)
                    }
                    // Echo unchanged (streamed back piece for piece in FULL_DUPLEX mode).
                    None if self.response_streamed => streamed_piece(b.body, b.end_of_stream),
                    None => CommonResponse::default(),
                };
                vec![ProcessingResponse {
                    response: Some(Resp::ResponseBody(BodyResponse {
                        response: Some(response),
                    })),
                    ..ProcessingResponse::default()
                }]
            }
            Some(Req::ResponseTrailers(_)) => {
                self.finish();
                let mut out = Vec::with_capacity(2);
                // Trailers end the body: what a restorer still holds goes out before them.
                if let Some(r) = self.restore.as_mut() {
                    let held = r.push(&[], true);
                    if !held.is_empty() {
                        out.push(ProcessingResponse {
                            response: Some(Resp::ResponseBody(BodyResponse {
                                response: Some(streamed_piece(held, false)),
                            })),
                            ..ProcessingResponse::default()
                        });
                    }
                }
                out.push(ProcessingResponse {
                    response: Some(Resp::ResponseTrailers(TrailersResponse::default())),
                    ..ProcessingResponse::default()
                });
                out
            }
            None => Vec::new(),
        }
    }

    /// Picks for `model` and takes the in-flight count at the primary. Under an `in-flight`
    /// policy the count is taken only below the cap, atomically; a pick that loses that race
    /// to a concurrent one is made again (a few times), so the cap is never passed. In
    /// [`PickMode::IfRoom`], a pick from a pool without room takes nothing and says so.
    fn pick(
        &self,
        model: Option<&str>,
        prefix: &[u64],
        session: Option<usize>,
        rng: &mut fastrand::Rng,
        mode: PickMode,
    ) -> Result<Placed, PickError> {
        let (sheddable, no_room) = match mode {
            PickMode::Serve => (false, None),
            PickMode::IfRoom {
                sheddable,
                otherwise,
            } => (sheddable, Some(otherwise)),
        };
        let fleet = &self.fleet;
        let req = PickRequest {
            model,
            subset: self.subset.as_deref(),
            explain: tracing::enabled!(tracing::Level::DEBUG),
            prefix,
            session,
            sheddable,
        };
        for _ in 0..PICK_ATTEMPTS {
            let picked = schedule::pick(fleet, &req, &fleet.weights, fleet.fallbacks, rng);
            let pick = match (picked, no_room) {
                // In `in-flight` mode a full pool is at capacity rather than saturated: the
                // same "no room now" to admission and flow control.
                (Err(PickError::AtCapacity), Some(otherwise)) => {
                    return Ok(Placed::NoRoom(otherwise));
                }
                (Ok(pick), Some(otherwise)) if pick.tier == Tier::Saturated => {
                    return Ok(Placed::NoRoom(otherwise));
                }
                (other, _) => other?,
            };
            let ep = &fleet.endpoints[pick.primary];
            if let Some(guard) = InFlight::try_new(ep.clone(), pick.cap) {
                // The picked endpoint will hold this prompt's prefix in its cache.
                fleet.prefix.record(pick.primary, prefix);
                return Ok(Placed::Picked(pick, guard));
            }
        }
        match no_room {
            Some(otherwise) => Ok(Placed::NoRoom(otherwise)),
            None => Err(PickError::AtCapacity),
        }
    }

    /// Parses the body (if any), picks, and answers the request phase. `body_end` says the body
    /// ended with end-of-stream (so the last piece sent back must carry it).
    fn answer(&mut self, body_end: bool) -> Vec<ProcessingResponse> {
        self.answered = true;
        let has_body = !self.body.is_empty() || body_end;
        // The generation current now (the body may have taken a while): the pick is made in it,
        // and its indices are what the stream keeps from here.
        self.fleet = self.picker.fleet.load_full();
        let fleet = self.fleet.clone();
        let mut rng = fastrand::Rng::new();
        let mut hashes = Vec::new();
        let model = match Api::from_path(&self.path) {
            Some(api) if has_body => match InferenceRequest::parse(api, &self.body) {
                Ok(req) => {
                    self.client_model = Some(req.model.clone());
                    let model = match fleet.rewrites.target(&req.model, &mut rng) {
                        Some(target) if target != req.model => {
                            let Some(body) = fleetpick_protocol::openai::replace_model(
                                &self.body, &req.model, target,
                            ) else {
                                return self.refuse(Refusal::RewriteAmbiguous);
                            };
                            self.body = body;
                            self.restore = Some(Restorer::new(&req.model, target));
                            target.to_string()
                        }
                        _ => req.model,
                    };
                    // The prefix hashes are seeded by the model that serves the request: its
                    // cache is the one that holds the prefix.
                    if let Some(first) = req.prompts.first()
                        && fleet
                            .weights_for(fleet.pool_for(&model), &fleet.weights)
                            .prefix
                            > 0.0
                    {
                        hashes = fleetpick_core::prefix::prompt_hashes(
                            &model,
                            req.cache_salt.as_deref(),
                            &first.hash_bytes(),
                        );
                    }
                    Some(model)
                }
                Err(e) => return self.refuse(Refusal::BadBody(e)),
            },
            Some(_) => {
                return self.refuse(Refusal::NoBody);
            }
            // Not an inference request (GET /v1/models, /health): any endpoint by load.
            _ => None,
        };
        let pool = model.as_deref().and_then(|m| fleet.pool_for(m));
        let session_key = pool
            .and_then(|p| fleet.pools[p].sessions.as_ref())
            .and_then(|s| self.session_key(&s.key));
        let objective = pool.zip(model.as_deref()).and_then(|(p, m)| {
            let named = self.request_header(OBJECTIVE_HEADER);
            fleet.objective(p, m, named.as_deref())
        });
        let priority = objective.map_or(0, |o| o.priority);
        self.objective = objective.map(|o| o.name.clone());
        // The fairness key matters only to a queue.
        let flow = if pool.is_some_and(|p| fleet.pools[p].queue.is_some()) {
            self.request_header(FAIRNESS_HEADER)
                .or_else(|| self.objective.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let pending = Pending {
            model,
            pool,
            hashes,
            session_key,
            priority,
            flow,
            has_body,
            body_end,
        };
        self.place(pending, false, &mut rng)
    }

    /// Admits and picks: sheddable requests are refused while their pool is saturated; with
    /// flow control, others wait in the queue then (and whenever others are waiting already:
    /// no overtaking). `released`: the request comes out of the queue, and goes now.
    fn place(
        &mut self,
        pending: Pending,
        released: bool,
        rng: &mut fastrand::Rng,
    ) -> Vec<ProcessingResponse> {
        let fleet = self.fleet.clone();
        let (pool, priority) = (pending.pool, pending.priority);
        let queue = pool.and_then(|p| fleet.pools[p].queue.as_ref());
        let flow = match queue {
            None => Flow::Off,
            Some(q) if q.is_empty() && q.in_transit() == 0 => Flow::Idle,
            Some(_) => Flow::Waiting,
        };
        let admission = admission::admit(Ask { priority, released }, flow);
        if admission == Admission::Queue {
            return self.hold(queue, pending);
        }
        let sessions = pool.and_then(|p| fleet.pools[p].sessions.as_ref());
        let bound = sessions
            .zip(pending.session_key.as_deref())
            .and_then(|(s, k)| match &s.key {
                SessionKey::Header(_) => s.get(k),
                // The cookie names its endpoint: nothing to remember.
                SessionKey::Cookie(_) => fleet.endpoint_for_token(k),
            });
        let Admission::Pick(mode) = admission else {
            return self.shed(&pending);
        };
        let pick_started = std::time::Instant::now();
        let placed = self.pick(pending.model.as_deref(), &pending.hashes, bound, rng, mode);
        let (pick, guard) = match placed {
            Ok(Placed::Picked(pick, guard)) => (pick, guard),
            Ok(Placed::NoRoom(NoRoom::Queue)) => return self.hold(queue, pending),
            Ok(Placed::NoRoom(NoRoom::Shed)) => return self.shed(&pending),
            Err(e) => return self.refuse(e.into()),
        };
        let outcome = if released {
            FlowOutcome::Released
        } else {
            FlowOutcome::Admitted
        };
        self.count_flow(pool, priority, outcome);
        let Pending {
            model,
            session_key,
            has_body,
            body_end,
            ..
        } = pending;
        if let Some(s) = sessions
            && bound != Some(pick.primary)
        {
            match (&s.key, session_key) {
                (SessionKey::Header(_), Some(k)) => s.bind(&k, pick.primary),
                (SessionKey::Header(_), None) => {}
                // A new session, or one that moved: the cookie names its new endpoint.
                (SessionKey::Cookie(name), _) => {
                    let token = endpoint_token(&fleet.endpoints[pick.primary].addr_text);
                    self.set_cookie =
                        Some(format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax"));
                }
            }
        }
        let endpoints = &fleet.endpoints;
        let mut destination = endpoints[pick.primary].addr_text.clone();
        for &f in &pick.fallbacks {
            destination.push(',');
            destination.push_str(&endpoints[f].addr_text);
        }
        let primary = &endpoints[pick.primary];
        self.picker.metrics.picked(
            &fleet,
            primary.pool,
            primary.cluster,
            pick.tier,
            pick.dry_run,
        );
        let request_trace = RequestTrace::start(self.request_header(TRACEPARENT).as_deref(), rng);
        let trace = request_trace.context;
        self.trace = Some(request_trace);
        match &pick.explain {
            Some(why) => tracing::debug!(
                model = model.as_deref().unwrap_or(""),
                %destination,
                trace_id = %trace.trace_id_hex(),
                tier = pick.tier.as_str(),
                dry_run = pick.dry_run.map(|v| v.as_str()),
                candidates = %why,
                "picked"
            ),
            None => tracing::trace!(%destination, trace_id = %trace.trace_id_hex(), "picked"),
        }
        self.in_flight = Some(guard);
        self.model = model;
        self.picked_at = std::time::Instant::now();
        let target = self.model.as_deref().unwrap_or("");
        self.picker.metrics.request_started(
            self.client_model.as_deref().unwrap_or(target),
            target,
            pick_started.elapsed(),
        );
        let mut mutation = destination_mutation(&destination);
        // The model server's spans hang under the pick's.
        mutation
            .set_headers
            .push(set_header(TRACEPARENT, &trace.to_string()));
        if !self.trace.as_ref().is_some_and(|t| t.continued) {
            mutation.remove_headers.push(TRACESTATE.into());
        }
        let metadata = Some(lb_metadata(&destination));
        if !has_body {
            let mut r = headers_response(Resp::RequestHeaders, Some(mutation));
            r.dynamic_metadata = metadata;
            return vec![r];
        }
        match self.mode {
            BodyMode::Buffered => {
                let body_mutation = self.restore.is_some().then(|| {
                    // The rewritten body replaces the buffered one, with its own length.
                    let body = std::mem::take(&mut self.body);
                    mutation
                        .set_headers
                        .push(set_header("content-length", &body.len().to_string()));
                    BodyMutation {
                        mutation: Some(Mutation::Body(body)),
                    }
                });
                vec![ProcessingResponse {
                    response: Some(Resp::RequestBody(BodyResponse {
                        response: Some(CommonResponse {
                            header_mutation: Some(mutation),
                            body_mutation,
                            ..CommonResponse::default()
                        }),
                    })),
                    dynamic_metadata: metadata,
                    ..ProcessingResponse::default()
                }]
            }
            BodyMode::FullDuplex => {
                let mut out = Vec::with_capacity(2 + self.body.len() / MAX_PIECE);
                let mut headers = headers_response(Resp::RequestHeaders, Some(mutation));
                headers.dynamic_metadata = metadata;
                out.push(headers);
                let body = std::mem::take(&mut self.body);
                if body.len() <= MAX_PIECE {
                    out.push(body_piece(body, body_end));
                } else {
                    let pieces = body.len().div_ceil(MAX_PIECE);
                    for (i, piece) in body.chunks(MAX_PIECE).enumerate() {
                        out.push(body_piece(piece.to_vec(), body_end && i + 1 == pieces));
                    }
                }
                out
            }
        }
    }

    /// Holds a request the pool has no room for in the pool's queue. (Admission queues only
    /// in a pool with flow control; were there no queue, the request would be shed.)
    fn hold(
        &mut self,
        queue: Option<&Arc<FlowQueue>>,
        pending: Pending,
    ) -> Vec<ProcessingResponse> {
        match queue {
            Some(q) => self.enqueue(q, pending),
            None => self.shed(&pending),
        }
    }

    /// Refuses a sheddable request its pool has no room for.
    fn shed(&mut self, pending: &Pending) -> Vec<ProcessingResponse> {
        self.refuse_held(pending, Refusal::Shed)
    }

    /// Refuses a request admission or the queue held, counting what flow control did with it.
    fn refuse_held(&mut self, pending: &Pending, refusal: Refusal) -> Vec<ProcessingResponse> {
        if let Some(outcome) = refusal.row().flow {
            self.count_flow(pending.pool, pending.priority, outcome);
        }
        self.refuse(refusal)
    }

    /// Puts the request in `queue`; the stream's task waits for its release.
    fn enqueue(&mut self, queue: &Arc<FlowQueue>, pending: Pending) -> Vec<ProcessingResponse> {
        match queue.enqueue(pending.priority, &pending.flow, self.body.len()) {
            Ok(ticket) => {
                self.count_flow(pending.pool, pending.priority, FlowOutcome::Queued);
                self.queued = Some(Queued { ticket, pending });
                Vec::new()
            }
            Err(e) => self.refuse_held(&pending, Refusal::QueueFull(e)),
        }
    }

    /// The client left while its request waited in the queue.
    fn cancelled(&mut self, queued: Queued) {
        let Pending { pool, priority, .. } = queued.pending;
        self.count_flow(pool, priority, FlowOutcome::Cancelled);
    }

    /// Counts what admission or the queue did with a request of `pool` (none: not counted).
    fn count_flow(&self, pool: Option<usize>, priority: i32, outcome: FlowOutcome) {
        if let Some(p) = pool {
            self.picker.metrics.flow(&self.fleet, p, priority, outcome);
        }
    }

    /// Goes on with a request the queue let go (or answers 503 if it waited too long).
    fn resume(&mut self, queued: Queued, outcome: Outcome) -> Vec<ProcessingResponse> {
        let Queued {
            ticket,
            mut pending,
        } = queued;
        let waited = ticket.enqueued.elapsed();
        match outcome {
            Outcome::Released => {
                if let Some(p) = pending.pool {
                    self.picker.metrics.waited(&self.fleet, p, waited);
                }
                // A reload while it waited: pick in the generation current now (its policies,
                // its endpoints). Nothing of the old one is held yet but the pool's index.
                let current = self.picker.fleet.load_full();
                if current.generation != self.fleet.generation {
                    pending.pool = pending.model.as_deref().and_then(|m| current.pool_for(m));
                    self.fleet = current;
                }
                let mut out = self.place(pending, true, &mut fastrand::Rng::new());
                // In transit until now: the pick counts on its endpoint from here.
                drop(ticket);
                if std::mem::take(&mut self.trailers_pending) && !self.closed {
                    out.push(trailers_response());
                }
                out
            }
            Outcome::Expired => self.refuse_held(&pending, Refusal::QueueTimeout { waited }),
        }
    }

    /// A request header's value, by lowercase name.
    fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .as_ref()
            .and_then(|h| header(h, name))
            .filter(|v| !v.is_empty())
    }

    /// The request's session key, from the header or cookie the pool names.
    fn session_key(&self, key: &SessionKey) -> Option<String> {
        let h = self.request_headers.as_ref()?;
        match key {
            SessionKey::Header(name) => header(h, name).filter(|v| !v.is_empty()),
            SessionKey::Cookie(name) => {
                let cookies = header(h, "cookie")?;
                cookie_value(&cookies, name)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            }
        }
    }

    /// Ends the stream with an immediate response in the OpenAI error shape.
    fn refuse(&mut self, refusal: Refusal) -> Vec<ProcessingResponse> {
        let row = refusal.row();
        self.answered = true;
        self.closed = true;
        self.refused_status = Some(row.status);
        let response = refusal.response();
        tracing::debug!(
            status = row.status,
            reason = row.label,
            message = %refusal.error().message,
            "refused"
        );
        self.picker.metrics.refused(row.label);
        let target = self.model.as_deref().unwrap_or("");
        self.picker.metrics.request_failed(
            self.client_model.as_deref().unwrap_or(target),
            target,
            row.label,
        );
        vec![response]
    }
}

fn header(h: &HttpHeaders, name: &str) -> Option<String> {
    let map = h.headers.as_ref()?;
    let hv = map.headers.iter().find(|hv| hv.key == name)?;
    if !hv.raw_value.is_empty() {
        return String::from_utf8(hv.raw_value.clone()).ok();
    }
    Some(hv.value.clone())
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.as_bytes().to_vec(),
            ..HeaderValue::default()
        }),
        // Overwrite: a destination the client sent must never survive.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

fn destination_mutation(destination: &str) -> HeaderMutation {
    HeaderMutation {
        set_headers: vec![set_header(DESTINATION_HEADER, destination)],
        ..HeaderMutation::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn lb_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(destination))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

fn headers_response(
    wrap: fn(HeadersResponse) -> Resp,
    mutation: Option<HeaderMutation>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(wrap(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: mutation,
                ..CommonResponse::default()
            }),
        })),
        ..ProcessingResponse::default()
    }
}

fn trailers_response() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::RequestTrailers(TrailersResponse::default())),
        ..ProcessingResponse::default()
    }
}

fn streamed_piece(body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
    CommonResponse {
        body_mutation: Some(BodyMutation {
            mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                body,
                end_of_stream,
                ..StreamedBodyResponse::default()
            })),
        }),
        ..CommonResponse::default()
    }
}

fn body_piece(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::RequestBody(BodyResponse {
            response: Some(streamed_piece(body, end_of_stream)),
        })),
        ..ProcessingResponse::default()
    }
}

/// The subset hint: `None` when the proxy gave none; `Some(empty)` means nothing is allowed.
fn subset_hint(md: Option<&Metadata>) -> Option<Vec<SocketAddr>> {
    let fields = &md?.filter_metadata.get(SUBSET_NAMESPACE)?.fields;
    let list = match fields.get(SUBSET_KEY)?.kind.as_ref()? {
        Kind::ListValue(l) => l,
        _ => return Some(Vec::new()),
    };
    Some(
        list.values
            .iter()
            .filter_map(|v| match v.kind.as_ref()? {
                Kind::StringValue(s) => s.parse().ok(),
                _ => None,
            })
            .collect(),
    )
}

fn served_endpoint(md: Option<&Metadata>) -> Option<String> {
    match md?
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED_KEY)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}
