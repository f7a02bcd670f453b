//! One simulated model server: its OpenAI-compatible HTTP API, the task that drives its engine
//! in (scaled) real time, its faults, and its stop/start lifecycle.
//!
//! Every response carries `x-sim-server` (and `x-sim-cluster`) naming who served it, so tests
//! and benchmarks can see where a request went without asking the picker; a generation's
//! response carries `x-sim-model`, the model it was asked for (what a rewrite made of it), and
//! `x-sim-queue-ahead`, the requests it found waiting for the batch. `x-sim-traceparent` and
//! `x-sim-tracestate` echo the W3C trace headers the request arrived with, as a traced server
//! would record them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use super::engine::{Engine, FinishReason, SeqEvent, SeqRequest, SeqUsage, SimTime};
use super::kv::{block_hashes, chain_seed};
use super::metrics::{self, Snapshot};
use super::params::EngineParams;
use super::template;
use fleetpick_protocol::openai::{Api, ApiError, InferenceRequest, Input};

/// The headers naming the simulated server that answered, and its cluster.
pub use fleetpick_protocol::headers::{
    SIM_CLUSTER_HEADER as CLUSTER_HEADER, SIM_SERVER_HEADER as SERVER_HEADER,
};
/// The model a generation was asked for, as the server received it (after any rewrite).
pub const MODEL_HEADER: &str = "x-sim-model";
/// Requests waiting for a place in the batch when this one arrived: the queue it found, which
/// its time to first token follows (tests read it instead of timing).
pub const QUEUE_AHEAD_HEADER: &str = "x-sim-queue-ahead";
/// The `traceparent` the request came with (absent: none).
pub const TRACEPARENT_HEADER: &str = "x-sim-traceparent";
/// The `tracestate` the request came with (absent: none).
pub const TRACESTATE_HEADER: &str = "x-sim-tracestate";

/// Largest request body accepted; far above any real prompt, it only bounds memory.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How far (in wall time) the engine's virtual clock may fall behind the real one before it
/// jumps ahead instead of catching up with back-to-back steps.
const MAX_LAG: Duration = Duration::from_millis(10);

/// The resolution of Tokio's timer.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// Maps simulated time to wall time: every simulated duration is divided by `scale`.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    epoch: Instant,
    scale: f64,
}

impl SimClock {
    pub fn new(scale: f64) -> SimClock {
        SimClock {
            epoch: Instant::now(),
            scale,
        }
    }

    pub fn now(&self) -> SimTime {
        self.epoch.elapsed().as_secs_f64() * self.scale
    }

    fn instant_at(&self, t: SimTime) -> Instant {
        self.epoch + Duration::from_secs_f64((t / self.scale).max(0.0))
    }

    /// The wall time a simulated duration takes.
    pub fn wall(&self, simulated: Duration) -> Duration {
        simulated.div_f64(self.scale)
    }
}

/// Run-time state of a cluster shared by its servers.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub name: String,
    /// Simulated network delay added to each request, in microseconds.
    delay_us: AtomicU64,
}

impl ClusterState {
    pub fn new(name: String, delay_ms: f64) -> ClusterState {
        let state = ClusterState {
            name,
            delay_us: AtomicU64::new(0),
        };
        state.set_delay_ms(delay_ms);
        state
    }

    pub fn set_delay_ms(&self, ms: f64) {
        self.delay_us.store((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn delay_ms(&self) -> f64 {
        self.delay_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Faults injected through the admin API.
#[derive(Debug, Default)]
struct Faults {
    /// Share of inference requests failed at once, in parts per million.
    error_ppm: AtomicU32,
    error_status: AtomicU32,
    /// Simulated delay before `/metrics` answers, in microseconds.
    metrics_delay_us: AtomicU64,
    /// The page `/metrics` keeps serving while frozen.
    frozen_page: Mutex<Option<Bytes>>,
    /// KV-cache usage `/metrics` reports instead of the real one (f64 bits; NaN: none), to
    /// stand in for a server that is full for reasons the simulator does not model.
    kv_override: AtomicU64,
}

/// The lifecycle of the listener: stopping aborts the accept task, which drops the listening
/// socket (new connections are refused) and every open connection with it.
#[derive(Debug, Default)]
struct Lifecycle {
    accept: Option<JoinHandle<()>>,
    started_unix: f64,
}

/// One simulated server.
#[derive(Debug)]
pub struct SimServer {
    pub name: String,
    pub cluster: Arc<ClusterState>,
    params: EngineParams,
    clock: SimClock,
    engine: Mutex<Engine>,
    wake: Notify,
    faults: Faults,
    lifecycle: Mutex<Lifecycle>,
    addr: Mutex<SocketAddr>,
    seed: u64,
    requests: AtomicU64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The server's status, as the admin API reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub cluster: String,
    pub address: String,
    pub up: bool,
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub prefix_hits: u64,
    pub prefix_queries: u64,
    pub completed: u64,
    pub error_rate: f64,
    pub metrics_frozen: bool,
    pub metrics_delay_ms: f64,
    pub kv_usage_override: Option<f64>,
}

impl SimServer {
    pub fn new(
        name: String,
        cluster: Arc<ClusterState>,
        params: EngineParams,
        clock: SimClock,
        addr: SocketAddr,
        seed: u64,
    ) -> Arc<SimServer> {
        Arc::new(SimServer {
            engine: Mutex::new(Engine::new(params.clone())),
            name,
            cluster,
            params,
            clock,
            wake: Notify::new(),
            faults: Faults {
                error_status: AtomicU32::new(503),
                kv_override: AtomicU64::new(f64::NAN.to_bits()),
                ..Faults::default()
            },
            lifecycle: Mutex::new(Lifecycle::default()),
            addr: Mutex::new(addr),
            seed,
            requests: AtomicU64::new(0),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock()
    }

    pub fn is_up(&self) -> bool {
        self.lifecycle.lock().accept.is_some()
    }

    /// Starts listening (on the port it had before, after a stop) and, on first start, the
    /// engine driver. Starting a running server does nothing.
    pub async fn start(self: &Arc<Self>) -> std::io::Result<SocketAddr> {
        if self.is_up() {
            return Ok(self.addr());
        }
        let listener = TcpListener::bind(self.addr()).await?;
        let addr = listener.local_addr()?;
        *self.addr.lock() = addr;
        let mut life = self.lifecycle.lock();
        if life.accept.is_none() {
            life.accept = Some(tokio::spawn(accept_loop(self.clone(), listener)));
            life.started_unix = unix_now();
        }
        Ok(addr)
    }

    /// Stops like a crashed process: the port refuses connections, open connections drop, and
    /// the engine loses its queue and its cache.
    /// Returns once the port is closed.
    pub async fn stop(&self) {
        let accept = self.lifecycle.lock().accept.take();
        if let Some(task) = accept {
            task.abort();
            // Wait for the abort to land so the listening socket is closed when we return.
            let _ = task.await;
        }
        self.engine.lock().reset();
        *self.faults.frozen_page.lock() = None;
    }

    pub fn set_error_rate(&self, rate: f64, status: u16) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.faults.error_ppm.store(ppm, Ordering::Relaxed);
        self.faults
            .error_status
            .store(u32::from(status), Ordering::Relaxed);
    }

    /// Freezes `/metrics` on the page it shows now, or unfreezes it.
    pub fn freeze_metrics(&self, frozen: bool) {
        let page = frozen.then(|| Bytes::from(self.render_metrics()));
        *self.faults.frozen_page.lock() = page;
    }

    /// Makes `/metrics` report this KV-cache usage (`None`: the real one).
    pub fn set_kv_override(&self, usage: Option<f64>) {
        let bits = usage.map_or(f64::NAN, |u| u.clamp(0.0, 1.0)).to_bits();
        self.faults.kv_override.store(bits, Ordering::Relaxed);
    }

    fn kv_override(&self) -> Option<f64> {
        let v = f64::from_bits(self.faults.kv_override.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }

    pub fn set_metrics_delay_ms(&self, ms: f64) {
        self.faults
            .metrics_delay_us
            .store((ms.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn status(&self) -> ServerStatus {
        let (gauges, stats) = {
            let engine = self.engine.lock();
            (engine.gauges(), engine.stats().clone())
        };
        ServerStatus {
            name: self.name.clone(),
            cluster: self.cluster.name.clone(),
            address: self.addr().to_string(),
            up: self.is_up(),
            running: gauges.running,
            waiting: gauges.waiting,
            kv_usage: gauges.kv_usage,
            prefix_hits: stats.prefix_hits,
            prefix_queries: stats.prefix_queries,
            completed: stats.success_length + stats.success_stop,
            error_rate: f64::from(self.faults.error_ppm.load(Ordering::Relaxed)) / 1e6,
            metrics_frozen: self.faults.frozen_page.lock().is_some(),
            metrics_delay_ms: self.faults.metrics_delay_us.load(Ordering::Relaxed) as f64 / 1000.0,
            kv_usage_override: self.kv_override(),
        }
    }

    pub fn render_metrics(&self) -> String {
        let snap = {
            let engine = self.engine.lock();
            let mut gauges = engine.gauges();
            if let Some(kv) = self.kv_override() {
                gauges.kv_usage = kv;
            }
            Snapshot {
                gauges,
                stats: engine.stats().clone(),
                started_unix: self.lifecycle.lock().started_unix,
                now_unix: unix_now(),
            }
        };
        metrics::render(&self.params, &snap)
    }

    /// Runs the engine: plans a step, waits out its (scaled) duration, completes it; sleeps
    /// while idle until a request arrives. Steps run back to back on a virtual clock so that
    /// timer granularity does not stretch simulated time.
    pub async fn drive(self: Arc<Self>) {
        let mut busy_until: Option<SimTime> = None;
        loop {
            let wall_now = self.clock.now();
            let max_lag = MAX_LAG.as_secs_f64() * self.clock.scale;
            let start = match busy_until {
                Some(t) if wall_now - t < max_lag => t,
                _ => wall_now,
            };
            let planned = self.engine.lock().plan_step(start);
            match planned {
                None => {
                    busy_until = None;
                    self.wake.notified().await;
                }
                Some(d) => {
                    let end = start + d;
                    let deadline = self.clock.instant_at(end);
                    if deadline > Instant::now() + TIMER_RESOLUTION {
                        tokio::time::sleep_until(deadline.into()).await;
                    } else {
                        // Tokio's timer would stretch a shorter wait to a whole millisecond (a
                        // step at --time-scale 1000 lasts 25 us): run the step at once instead,
                        // letting the virtual clock lead the real one by less than that.
                        tokio::task::yield_now().await;
                    }
                    self.engine.lock().complete_step(end);
                    busy_until = Some(end);
                }
            }
        }
    }

    /// Queues a request's sequences in the engine and wakes its driver; returns how many
    /// sequences were waiting before them.
    fn submit(&self, seqs: Vec<SeqRequest>) -> usize {
        let now = self.clock.now();
        let ahead = {
            let mut engine = self.engine.lock();
            let ahead = engine.waiting_len();
            for s in seqs {
                engine.submit(s, now);
            }
            ahead
        };
        self.wake.notify_one();
        ahead
    }

    fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics_page))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(
                self.clone(),
                network_and_identity,
            ))
            .with_state(self.clone())
    }
}

async fn accept_loop(server: Arc<SimServer>, listener: TcpListener) {
    let router = server.router();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(server = %server.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    // A client that resets mid-request is routine for a model server.
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Adds the cluster's network delay before the request is handled, and names the server on
/// the response.
async fn network_and_identity(
    State(server): State<Arc<SimServer>>,
    request: Request,
    next: Next,
) -> Response {
    let delay_us = server.cluster.delay_us.load(Ordering::Relaxed);
    if delay_us > 0 {
        tokio::time::sleep(server.clock.wall(Duration::from_micros(delay_us))).await;
    }
    let trace = [
        (fleetpick_protocol::headers::TRACEPARENT, TRACEPARENT_HEADER),
        (fleetpick_protocol::headers::TRACESTATE, TRACESTATE_HEADER),
    ]
    .map(|(from, to)| (to, request.headers().get(from).cloned()));
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in trace {
        if let Some(v) = value {
            headers.insert(name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&server.name) {
        headers.insert(SERVER_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&server.cluster.name) {
        headers.insert(CLUSTER_HEADER, v);
    }
    response
}

fn error_response(err: &ApiError) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        err.body(),
    )
        .into_response()
}

async fn not_found() -> Response {
    error_response(&ApiError::new(404, "not_found_error", "no such route"))
}

async fn method_not_allowed() -> Response {
    error_response(&ApiError::new(
        405,
        "invalid_request_error",
        "method not allowed on this route",
    ))
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn models(State(server): State<Arc<SimServer>>) -> Response {
    let p = &server.params;
    let mut data = vec![
        json!({"id": p.model, "object": "model", "owned_by": "fleetpick-sim", "root": p.model, "parent": null}),
    ];
    for a in &p.lora_adapters {
        data.push(json!({"id": a, "object": "model", "owned_by": "fleetpick-sim", "root": a, "parent": p.model}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics_page(State(server): State<Arc<SimServer>>) -> Response {
    let delay_us = server.faults.metrics_delay_us.load(Ordering::Relaxed);
    if delay_us > 0 {
        tokio::time::sleep(server.clock.wall(Duration::from_micros(delay_us))).await;
    }
    let frozen = server.faults.frozen_page.lock().clone();
    let body = match frozen {
        Some(page) => page,
        None => Bytes::from(server.render_metrics()),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn completions(State(server): State<Arc<SimServer>>, request: Request) -> Response {
    generate(server, Api::Completions, request).await
}

async fn chat_completions(State(server): State<Arc<SimServer>>, request: Request) -> Response {
    generate(server, Api::ChatCompletions, request).await
}

/// Reads a request body of at most [`MAX_BODY_BYTES`]; a declared length over the limit is
/// refused before any of the body is read.
async fn read_body(request: Request) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                too_large()
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })
}

/// Words the simulated model "generates", one per token.
const WORDS: &[&str] = &[
    " the", " model", " server", " token", " cache", " request", " cluster", " region", " latency",
    " batch", " prefix", " queue", " picker", " envoy", " route", " fleet", " of", " and", " to",
    " in", " is", " for", " with", " on", " fast", " warm", " block", " load", " busy", " idle",
    " near", " far",
];

/// A request accepted for generation: what the response needs besides the tokens.
struct Generation {
    id: String,
    created: u64,
    model: String,
    api: Api,
    sequences: usize,
    include_usage: bool,
    rng: fastrand::Rng,
}

impl Generation {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::ChatCompletions, false) => "chat.completion",
            (Api::ChatCompletions, true) => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    fn word(&mut self) -> &'static str {
        WORDS[self.rng.usize(..WORDS.len())]
    }

    fn usage_json(total: &SeqUsage) -> serde_json::Value {
        json!({
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "total_tokens": total.prompt_tokens + total.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": total.cached_tokens},
        })
    }

    fn choice(
        &self,
        index: u32,
        text: &str,
        finish: Option<FinishReason>,
        chunk: bool,
    ) -> serde_json::Value {
        let finish = finish.map(FinishReason::as_str);
        match (self.api, chunk) {
            (Api::ChatCompletions, false) => {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
            (Api::ChatCompletions, true) => {
                json!({"index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": finish})
            }
            _ => json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }

    fn sse(&self, choices: Vec<serde_json::Value>, usage: Option<serde_json::Value>) -> String {
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        format!("data: {v}\n\n")
    }
}

fn add_usage(total: &mut SeqUsage, u: &SeqUsage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.cached_tokens += u.cached_tokens;
}

async fn generate(server: Arc<SimServer>, api: Api, request: Request) -> Response {
    let body = match read_body(request).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let n = server.requests.fetch_add(1, Ordering::Relaxed);
    // One generator per request, seeded by arrival order: runs repeat for a given seed.
    let mut rng = fastrand::Rng::with_seed(server.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let error_ppm = server.faults.error_ppm.load(Ordering::Relaxed);
    if error_ppm > 0 && rng.u32(..1_000_000) < error_ppm {
        let status = server.faults.error_status.load(Ordering::Relaxed) as u16;
        return error_response(&ApiError::new(status, "server_error", "injected fault"));
    }
    let req = match InferenceRequest::parse(api, &body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    drop(body);
    let (stream, include_usage) = (req.stream, req.include_usage);
    let Planned {
        model,
        seqs,
        events,
    } = match plan(&server.params, req) {
        Ok(planned) => planned,
        Err(e) => return error_response(&e),
    };
    let sequences = seqs.len();
    let queue_ahead = server.submit(seqs);
    let prefix = if api == Api::ChatCompletions {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let model_header = HeaderValue::from_str(&model).ok();
    let gen_state = Generation {
        id: format!("{prefix}-{}-{n}", server.name),
        created: unix_now() as u64,
        model,
        api,
        sequences,
        include_usage,
        rng,
    };
    let mut response = if stream {
        stream_response(gen_state, events)
    } else {
        whole_response(gen_state, events).await
    };
    if let Some(v) = model_header {
        response.headers_mut().insert(MODEL_HEADER, v);
    }
    response
        .headers_mut()
        .insert(QUEUE_AHEAD_HEADER, HeaderValue::from(queue_ahead));
    response
}

/// What a parsed request asks of this server's engine.
struct Planned {
    /// The base model or one of the adapters.
    model: String,
    seqs: Vec<SeqRequest>,
    /// Where the sequences' events will come.
    events: mpsc::UnboundedReceiver<SeqEvent>,
}

/// Plans a parsed request for this server's engine: a model it does not serve is a 404, a prompt
/// too long for it a 400.
fn plan(p: &EngineParams, req: InferenceRequest) -> Result<Planned, ApiError> {
    let InferenceRequest {
        model,
        input,
        stream,
        max_tokens,
        cache_salt,
        ..
    } = req;
    let adapter: Option<Arc<str>> = if model == p.model {
        None
    } else if p.lora_adapters.contains(&model) {
        Some(Arc::from(model.as_str()))
    } else {
        return Err(ApiError::model_not_found(&model));
    };
    let (max_tokens, finish_reason) = match max_tokens {
        Some(m) => (m, FinishReason::Length),
        None => (p.default_max_tokens, FinishReason::Stop),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = SeqShared {
        max_tokens,
        finish_reason,
        adapter,
        stream,
        events: tx,
    };
    let seqs = sequences(p, &model, cache_salt.as_deref(), input, shared)?;
    Ok(Planned {
        model,
        seqs,
        events: rx,
    })
}

/// What every sequence of one request shares.
struct SeqShared {
    max_tokens: u32,
    finish_reason: FinishReason,
    adapter: Option<Arc<str>>,
    stream: bool,
    events: mpsc::UnboundedSender<SeqEvent>,
}

/// The engine's sequences for `input`: each prompt's token ids through the simulator's chat
/// template and tokenizer, and the chained hashes of their full blocks, seeded by the model and
/// the cache salt. A prompt too long for the model is refused, as vLLM refuses it.
fn sequences(
    p: &EngineParams,
    model: &str,
    salt: Option<&str>,
    input: Input,
    shared: SeqShared,
) -> Result<Vec<SeqRequest>, ApiError> {
    let seed = chain_seed(model, salt);
    let max_tokens = shared.max_tokens;
    template::sequences(input)
        .into_iter()
        .enumerate()
        .map(|(index, ids)| {
            let prompt_tokens = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(p.max_model_len) {
                return Err(ApiError {
                    param: Some("max_tokens"),
                    ..ApiError::bad_request(format!(
                        "this model's maximum context length is {} tokens; the request has {prompt_tokens} prompt tokens and asks for {max_tokens} more",
                        p.max_model_len
                    ))
                });
            }
            Ok(SeqRequest {
                index: index as u32,
                prompt_tokens,
                block_hashes: block_hashes(seed, &ids, p.block_size),
                max_tokens,
                finish_reason: shared.finish_reason,
                adapter: shared.adapter.clone(),
                stream: shared.stream,
                events: shared.events.clone(),
            })
        })
        .collect()
}

async fn whole_response(mut g: Generation, mut rx: mpsc::UnboundedReceiver<SeqEvent>) -> Response {
    let mut finished: Vec<Option<SeqUsage>> = vec![None; g.sequences];
    let mut left = g.sequences;
    while left > 0 {
        match rx.recv().await {
            Some(SeqEvent::Finished { index, usage }) => {
                if let Some(slot) = finished.get_mut(index as usize) {
                    *slot = Some(usage);
                    left -= 1;
                }
            }
            Some(SeqEvent::Token { .. }) => {}
            // The engine was reset (server stopped) before the sequence finished.
            None => {
                return error_response(&ApiError::new(503, "server_error", "the server restarted"));
            }
        }
    }
    let mut total = SeqUsage {
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
        finish_reason: FinishReason::Stop,
    };
    let mut choices = Vec::with_capacity(g.sequences);
    for (i, usage) in finished.iter().enumerate() {
        let Some(usage) = usage else { continue };
        let mut text = String::with_capacity(usage.completion_tokens as usize * 7);
        for _ in 0..usage.completion_tokens {
            text.push_str(g.word());
        }
        choices.push(g.choice(i as u32, &text, Some(usage.finish_reason), false));
        add_usage(&mut total, usage);
    }
    let body = json!({
        "id": g.id,
        "object": g.object(false),
        "created": g.created,
        "model": g.model,
        "choices": choices,
        "usage": Generation::usage_json(&total),
    });
    axum::Json(body).into_response()
}

/// Server-sent events: one chunk per token, the finish reason on each sequence's last chunk, a
/// usage chunk when asked for, then `data: [DONE]`.
fn stream_response(g: Generation, rx: mpsc::UnboundedReceiver<SeqEvent>) -> Response {
    struct St {
        g: Generation,
        rx: mpsc::UnboundedReceiver<SeqEvent>,
        left: usize,
        total: SeqUsage,
        started: bool,
        done: bool,
    }
    let left = g.sequences;
    let st = St {
        g,
        rx,
        left,
        total: SeqUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            finish_reason: FinishReason::Stop,
        },
        started: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = String::new();
        if !st.started && st.g.api == Api::ChatCompletions {
            let role: Vec<_> = (0..st.g.sequences)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            out.push_str(&st.g.sse(role, None));
        }
        st.started = true;
        match st.rx.recv().await {
            Some(SeqEvent::Token { index }) => {
                let word = st.g.word();
                let choice = st.g.choice(index, word, None, true);
                out.push_str(&st.g.sse(vec![choice], None));
            }
            Some(SeqEvent::Finished { index, usage }) => {
                add_usage(&mut st.total, &usage);
                let choice = st.g.choice(index, "", Some(usage.finish_reason), true);
                out.push_str(&st.g.sse(vec![choice], None));
                st.left -= 1;
                if st.left == 0 {
                    if st.g.include_usage {
                        let usage = Generation::usage_json(&st.total);
                        out.push_str(&st.g.sse(Vec::new(), Some(usage)));
                    }
                    out.push_str("data: [DONE]\n\n");
                    st.done = true;
                }
            }
            None => {
                // The server was stopped mid-stream: end the body without [DONE], as a crash would.
                st.done = true;
                return Some((Err(std::io::Error::other("server stopped")), st));
            }
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(out)), st))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
