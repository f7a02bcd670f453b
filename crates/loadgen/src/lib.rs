//! The load generator: sends OpenAI requests to a set of targets (simulated servers directly, or
//! a gateway) with closed-loop concurrency or Poisson arrivals, and records, per request, start,
//! first token, end, status and the server that answered (the simulator's `x-sim-server`).
//!
//! It reports its own CPU time (and that of a watched process, such as the simulator) so that a
//! benchmark on a small machine can state what share of the cores the load itself took.
//!
//! # Layout
//! - this module: workloads, arrivals, the run and its report.
//! - [`cpu`]: CPU time of processes and threads, read from `/proc` (also the benchmarks').

pub mod cpu;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use fleetpick_protocol::headers::SIM_SERVER_HEADER as SERVER_HEADER;
use fleetpick_protocol::openai::Api;

/// How requests arrive.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    /// `concurrency` clients, each sending its next request when the last one ends.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` per second, at most `max_in_flight` outstanding (beyond that
    /// the generator waits, and says so in the report).
    Poisson { rate: f64, max_in_flight: usize },
    /// Poisson arrivals whose rate is `rate x factor` for the first `on_s` seconds of every
    /// `on_s + off_s` and `rate` for the rest: bursts on a steady base.
    Bursts {
        rate: f64,
        factor: f64,
        on_s: f64,
        off_s: f64,
        max_in_flight: usize,
    },
}

impl Arrivals {
    /// The arrival rate `t` seconds into the run.
    fn rate_at(&self, t: f64) -> f64 {
        match *self {
            Arrivals::Closed { .. } => 0.0,
            Arrivals::Poisson { rate, .. } => rate,
            Arrivals::Bursts {
                rate,
                factor,
                on_s,
                off_s,
                ..
            } => {
                if t % (on_s + off_s) < on_s {
                    rate * factor
                } else {
                    rate
                }
            }
        }
    }
}

/// What each request looks like.
#[derive(Debug, Clone)]
pub struct Workload {
    pub api: Api,
    pub model: String,
    /// Bytes of prompt text unique to each request.
    pub prompt_bytes: usize,
    /// Bytes of prompt text shared within a group (a system prompt), before the unique part.
    pub shared_prefix_bytes: usize,
    /// Number of distinct shared prefixes; requests pick one at random.
    pub prefix_groups: usize,
    pub max_tokens: u32,
    pub stream: bool,
    /// Share of requests (0..1) whose unique part is `long_prompt_bytes` instead of
    /// `prompt_bytes`: a mix of long and short prompts.
    pub long_share: f64,
    pub long_prompt_bytes: usize,
    /// Send `GET <path>` instead of an inference request (to load `/metrics`, say).
    pub get_path: Option<String>,
    /// Headers on every request (an objective, a fairness id).
    pub headers: Vec<(String, String)>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            api: Api::Completions,
            model: fleetpick_protocol::engine::DEFAULT_MODEL.to_string(),
            prompt_bytes: 64,
            shared_prefix_bytes: 0,
            prefix_groups: 1,
            max_tokens: 4,
            stream: false,
            long_share: 0.0,
            long_prompt_bytes: 0,
            get_path: None,
            headers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Base URLs (`http://ip:port`); requests go round robin over them.
    pub targets: Vec<String>,
    pub arrivals: Arrivals,
    pub workload: Workload,
    /// Stop sending after this long...
    pub duration: Duration,
    /// ...or after this many requests, whichever comes first.
    pub max_requests: Option<usize>,
    pub seed: u64,
    /// A process whose CPU time over the run is reported beside the generator's own.
    pub watch_pid: Option<u32>,
}

/// One request's record. Times are microseconds from the start of the run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub start_us: u64,
    pub first_token_us: Option<u64>,
    pub end_us: u64,
    /// HTTP status, or 0 when no response came (connection refused, reset).
    pub status: u16,
    pub server: Option<String>,
    pub error: Option<String>,
    /// The request carried a long prompt (see [`Workload::long_share`]).
    #[serde(default)]
    pub long_prompt: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub wall_seconds: f64,
    pub ok_per_second: f64,
    /// Milliseconds.
    pub ttft_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
    /// Requests answered per server, by name.
    pub per_server: std::collections::BTreeMap<String, usize>,
    pub loadgen_cpu_seconds: Option<f64>,
    pub watched_cpu_seconds: Option<f64>,
    /// Times the Poisson generator had to wait for a free in-flight slot.
    pub arrivals_delayed: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub records: Vec<RequestRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no targets to send load to")]
    NoTargets,
    #[error("invalid load: {0}")]
    Invalid(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// p50, p90 and p99 of `v` (nearest rank), or `None` when it is empty.
pub fn percentiles(mut v: Vec<f64>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    })
}

/// Deterministic filler text: `n` bytes of lowercase words drawn from `seed`.
pub fn filler_text(seed: u64, n: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(n + 8);
    while s.len() < n {
        let len = rng.usize(2..9);
        for _ in 0..len {
            s.push(rng.lowercase());
        }
        s.push(' ');
    }
    s.truncate(n);
    s
}

impl Workload {
    /// The path and body of request number `i`, and whether its prompt is a long one.
    pub fn request(&self, i: u64, rng: &mut fastrand::Rng) -> (&'static str, Vec<u8>, bool) {
        let mut prompt = String::new();
        if self.shared_prefix_bytes > 0 {
            let group = rng.u64(..self.prefix_groups.max(1) as u64);
            prompt.push_str(&filler_text(
                group.wrapping_mul(0x5851_f42d),
                self.shared_prefix_bytes,
            ));
        }
        let long = self.long_share > 0.0 && rng.f64() < self.long_share;
        let unique = if long {
            self.long_prompt_bytes
        } else {
            self.prompt_bytes
        };
        prompt.push_str(&filler_text(
            i ^ 0xdead_beef_u64.wrapping_mul(i + 1),
            unique,
        ));
        let mut body = serde_json::json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        });
        if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let path = match self.api {
            Api::ChatCompletions => {
                body["messages"] = serde_json::json!([{"role": "user", "content": prompt}]);
                "/v1/chat/completions"
            }
            _ => {
                body["prompt"] = serde_json::Value::String(prompt);
                "/v1/completions"
            }
        };
        (path, body.to_string().into_bytes(), long)
    }
}

struct Shared {
    spec: LoadSpec,
    client: reqwest::Client,
    started: Instant,
    deadline: Instant,
    issued: AtomicUsize,
    records: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    /// Claims the next request number, or `None` when the run is over.
    fn next(&self) -> Option<usize> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        match self.spec.max_requests {
            Some(max) if i >= max => None,
            _ => Some(i),
        }
    }

    async fn send(&self, i: usize) {
        let target = &self.spec.targets[i % self.spec.targets.len()];
        let mut rng =
            fastrand::Rng::with_seed(self.spec.seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
        let mut long_prompt = false;
        let mut request = match &self.spec.workload.get_path {
            Some(path) => self.client.get(format!("{target}{path}")),
            None => {
                let (path, body, long) = self.spec.workload.request(i as u64, &mut rng);
                long_prompt = long;
                self.client
                    .post(format!("{target}{path}"))
                    .header("content-type", "application/json")
                    .body(body)
            }
        };
        for (k, v) in &self.spec.workload.headers {
            request = request.header(k, v);
        }
        let start = self.started.elapsed();
        let mut rec = RequestRecord {
            start_us: start.as_micros() as u64,
            first_token_us: None,
            end_us: 0,
            status: 0,
            server: None,
            error: None,
            long_prompt,
        };
        let result = request.send().await;
        match result {
            Ok(mut resp) => {
                rec.status = resp.status().as_u16();
                rec.server = resp
                    .headers()
                    .get(SERVER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                loop {
                    match resp.chunk().await {
                        Ok(Some(_)) => {
                            if rec.first_token_us.is_none() && self.spec.workload.stream {
                                rec.first_token_us =
                                    Some(self.started.elapsed().as_micros() as u64);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            rec.error = Some(format!("body: {e}"));
                            break;
                        }
                    }
                }
            }
            Err(e) => rec.error = Some(e.to_string()),
        }
        rec.end_us = self.started.elapsed().as_micros() as u64;
        if rec.first_token_us.is_none() && rec.status == 200 && rec.error.is_none() {
            rec.first_token_us = Some(rec.end_us);
        }
        self.records.lock().await.push(rec);
    }
}

/// Runs the load and returns every request's record with a summary.
pub async fn run(spec: LoadSpec) -> Result<Report, LoadError> {
    if spec.targets.is_empty() {
        return Err(LoadError::NoTargets);
    }
    match spec.arrivals {
        Arrivals::Closed { concurrency: 0 } => {
            return Err(LoadError::Invalid("concurrency must be at least 1".into()));
        }
        Arrivals::Poisson {
            rate,
            max_in_flight,
        }
        | Arrivals::Bursts {
            rate,
            max_in_flight,
            ..
        } if !(rate.is_finite() && rate > 0.0) || max_in_flight == 0 => {
            return Err(LoadError::Invalid(
                "rate must be positive and max_in_flight at least 1".into(),
            ));
        }
        Arrivals::Bursts {
            factor,
            on_s,
            off_s,
            ..
        } if !(factor.is_finite()
            && factor > 0.0
            && on_s > 0.0
            && off_s >= 0.0
            && (on_s + off_s).is_finite()) =>
        {
            return Err(LoadError::Invalid(
                "bursts need a positive factor and on_s, and off_s of at least 0".into(),
            ));
        }
        _ => {}
    }
    let in_flight_cap = match spec.arrivals {
        Arrivals::Closed { concurrency } => concurrency,
        Arrivals::Poisson { max_in_flight, .. } | Arrivals::Bursts { max_in_flight, .. } => {
            max_in_flight
        }
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(in_flight_cap)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600))
        .build()?;
    let cpu_self_before = crate::cpu::process_cpu_seconds(None);
    let cpu_watch_before = spec
        .watch_pid
        .and_then(|p| crate::cpu::process_cpu_seconds(Some(p)));
    let started = Instant::now();
    let shared = Arc::new(Shared {
        deadline: started + spec.duration,
        spec: spec.clone(),
        client,
        started,
        issued: AtomicUsize::new(0),
        records: Mutex::new(Vec::new()),
    });
    let mut delayed = 0;
    match spec.arrivals {
        Arrivals::Closed { concurrency } => {
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let shared = shared.clone();
                workers.spawn(async move {
                    while let Some(i) = shared.next() {
                        shared.send(i).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
        Arrivals::Poisson { max_in_flight, .. } | Arrivals::Bursts { max_in_flight, .. } => {
            let slots = Arc::new(Semaphore::new(max_in_flight));
            let mut rng = fastrand::Rng::with_seed(spec.seed);
            let mut next_at = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(i) = shared.next() {
                tokio::time::sleep_until(next_at.into()).await;
                // Exponential inter-arrival times give Poisson arrivals (for bursts, at the rate
                // in force when the gap starts).
                let rate = spec
                    .arrivals
                    .rate_at(next_at.duration_since(started).as_secs_f64());
                let gap = -(1.0 - rng.f64()).ln() / rate;
                next_at += Duration::from_secs_f64(gap);
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        delayed += 1;
                        match slots.clone().acquire_owned().await {
                            Ok(p) => p,
                            Err(_) => break,
                        }
                    }
                };
                let shared = shared.clone();
                tasks.spawn(async move {
                    shared.send(i).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_self =
        cpu_self_before.and_then(|b| crate::cpu::process_cpu_seconds(None).map(|a| a - b));
    let cpu_watch = cpu_watch_before.and_then(|b| {
        spec.watch_pid
            .and_then(|p| crate::cpu::process_cpu_seconds(Some(p)))
            .map(|a| a - b)
    });
    let mut records = std::mem::take(&mut *shared.records.lock().await);
    let mut summary = summarize(&mut records, wall);
    summary.loadgen_cpu_seconds = cpu_self;
    summary.watched_cpu_seconds = cpu_watch;
    summary.arrivals_delayed = delayed;
    Ok(Report { summary, records })
}

/// Sorts `records` by start and summarizes them over `wall` seconds: counts, throughput, time to
/// first token and end-to-end percentiles of the successful ones, answers per server. Records
/// from another load tool (inference-perf) are summarized the same way.
pub fn summarize(records: &mut [RequestRecord], wall: f64) -> Summary {
    records.sort_by_key(|r| r.start_us);
    let ok: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.status == 200 && r.error.is_none())
        .collect();
    let mut per_server = std::collections::BTreeMap::new();
    for r in &ok {
        if let Some(s) = &r.server {
            *per_server.entry(s.clone()).or_insert(0) += 1;
        }
    }
    Summary {
        requests: records.len(),
        ok: ok.len(),
        errors: records.len() - ok.len(),
        wall_seconds: wall,
        ok_per_second: ok.len() as f64 / wall.max(1e-9),
        ttft_ms: percentiles(
            ok.iter()
                .filter_map(|r| {
                    r.first_token_us
                        .map(|f| f.saturating_sub(r.start_us) as f64 / 1000.0)
                })
                .collect(),
        ),
        e2e_ms: percentiles(
            ok.iter()
                .map(|r| r.end_us.saturating_sub(r.start_us) as f64 / 1000.0)
                .collect(),
        ),
        per_server,
        loadgen_cpu_seconds: None,
        watched_cpu_seconds: None,
        arrivals_delayed: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn filler_is_deterministic_and_sized() {
        assert_eq!(filler_text(3, 100), filler_text(3, 100));
        assert_ne!(filler_text(3, 100), filler_text(4, 100));
        assert_eq!(filler_text(3, 100).len(), 100);
    }

    #[test]
    fn shared_prefix_groups_share_a_prefix() {
        let w = Workload {
            shared_prefix_bytes: 200,
            prefix_groups: 1,
            ..Workload::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let (_, a, _) = w.request(1, &mut rng);
        let (_, b, _) = w.request(2, &mut rng);
        let pa: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let pb: serde_json::Value = serde_json::from_slice(&b).unwrap();
        let (pa, pb) = (
            pa["prompt"].as_str().unwrap(),
            pb["prompt"].as_str().unwrap(),
        );
        assert_eq!(pa[..200], pb[..200]);
        assert_ne!(pa[200..], pb[200..]);
    }

    #[test]
    fn bursts_raise_the_rate_in_their_window() {
        let a = Arrivals::Bursts {
            rate: 2.0,
            factor: 5.0,
            on_s: 1.0,
            off_s: 3.0,
            max_in_flight: 1,
        };
        assert_eq!(a.rate_at(0.5), 10.0);
        assert_eq!(a.rate_at(2.0), 2.0);
        assert_eq!(a.rate_at(4.2), 10.0);
    }
}
