//! The fleet file: what the picker serves and how it decides, validated once at load.
//!
//! ```yaml
//! server:                     # the ext_proc listener and request handling
//!   listen: 127.0.0.1:9002
//!   body_mode: full-duplex    # full-duplex | buffered: what Envoy's filter is configured with
//!   max_body_bytes: 8388608   # larger request bodies get 413
//!   metrics_listen: 127.0.0.1:9090   # fleetpick's own /metrics, /healthz, /readyz (default: none)
//!   shutdown_grace_ms: 30000  # on SIGTERM: NOT_SERVING, open streams may finish this long
//!   tls:                      # TLS on the ext_proc listener (default: plaintext); re-read on change
//!     cert_file: tls/fleetpick.crt
//!     key_file: tls/fleetpick.key
//!     client_ca_file: tls/ca.crt   # mutual TLS: clients need a certificate from this CA
//! picker:
//!   region: us-east1          # the picker's region: clusters there are preferred
//! clusters:
//!   - name: us-east
//!     region: us-east1
//!     zone: us-east1-b
//!     labels: {tier: a100}
//!     rtt_ms: 1               # round trip from the picker (default: measured by the poller)
//! pools:
//!   - name: llama
//!     models: [meta-llama/Llama-3.1-8B-Instruct, sql-lora]
//!     engine: vllm            # vllm | sglang | trtllm | triton: which metric names to read
//!     target_port: 8000
//!     endpoints:
//!       us-east: [10.0.0.1, "10.0.0.2:8001"]   # ip (target_port) or ip:port
//!     exported_from: [us-east]  # default: every cluster listed under endpoints
//!     lora_adapters: [tool-lora]  # served too; requests prefer endpoints running them
//!     weights: {prefix: 8}    # this pool's scorer weights (default: scheduler.weights)
//!     session_affinity: {header: x-session-id}   # or {cookie: NAME}; max_sessions: 65536
//! imports:                    # default: every pool, default policy
//!   - pool: llama
//!     policy:
//!       balancing: kv-cache   # kv-cache (thresholds, soft) | in-flight (a hard cap)
//!       kv_cache_threshold: 0.8
//!       queue_threshold: 5
//!       max_in_flight_per_endpoint: 64
//!       capacity_scaler: 1    # 0 drains
//!       sheddable_capacity: 1 # share of it sheddable requests may fill (the rest is kept)
//!       dry_run: false
//!       scopes:
//!         - {match_labels: {tier: l4}, capacity_scaler: 0.5}
//! scheduler:
//!   weights: {kv_cache: 1, queue: 2, in_flight: 2, prefill: 3, rtt: 1, prefix: 6, lora: 4}
//!   fallbacks: 0              # extra endpoints after the primary in the destination list
//!   cluster_recovery_ms: 1000 # a failed cluster returns after this long healthy
//! rewrites:                   # client-facing names served as other models, by weight
//!   - model: chat
//!     targets: [{model: meta-llama/Llama-3.1-8B-Instruct, weight: 90}, {model: sql-lora, weight: 10}]
//! objectives:                 # InferenceObjectives (also read from the manifests)
//!   - {name: chat, pool: llama, priority: 10, models: [meta-llama/Llama-3.1-8B-Instruct]}
//!   - {name: batch, pool: llama, priority: -1}   # negative: sheddable while saturated
//! flow_control:               # hold requests while their pool is saturated
//!   enabled: false
//!   max_requests_per_band: 1000
//!   max_bytes_per_band: 268435456
//!   ttl_ms: 30000             # longer waits get 503
//! poller:
//!   interval_ms: 50
//!   timeout_ms: 1000
//!   stale_after_ms: 500
//!   backoff_max_ms: 1000
//! ```
//!
//! A running picker re-reads the file every second (and on SIGHUP) and applies a valid change
//! at once, as the next generation of the fleet (the core's `Fleet::successor`); only the `server` section needs a
//! restart. A file that does not validate is refused and the last good one stays.
//!
//! Unknown fields are errors. Every error names the field (`pools[0].endpoints.us-west`) and,
//! where it can be found, the line in the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use fleetpick_protocol::{BodyMode, EngineKind};

pub mod manifests;

pub use manifests::{Manifests, ObjectiveManifest, PoolManifest};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub body_mode: BodyMode,
    pub max_body_bytes: usize,
    /// fleetpick's own Prometheus `/metrics` listener (none by default).
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM, how long open streams may go on before fleetpick exits anyway.
    pub shutdown_grace_ms: u64,
    /// TLS (and with `client_ca_file`, mutual TLS) on the ext_proc listener; none: plaintext.
    pub tls: Option<TlsSettings>,
}

/// The ext_proc listener's TLS files, PEM, relative to the fleet file's directory. They are
/// re-read when they change (by the server's TLS module).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain the listener presents (leaf first).
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA bundle client certificates must chain to; set, a client without one is refused.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9002)),
            body_mode: BodyMode::FullDuplex,
            // Far above any chat prompt, below Envoy's own buffer limits in BUFFERED mode.
            max_body_bytes: 8 * 1024 * 1024,
            metrics_listen: None,
            shutdown_grace_ms: 30_000,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Round trip from the picker's site to this cluster. When absent, the poller's measured
    /// scrape round trip stands in.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
}

/// Where this picker runs: its region is the one it prefers (`fleetpick serve --region`
/// overrides it).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickerSite {
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// How a policy measures an endpoint's capacity, in the spirit of GKE's `GCPBackendPolicy`
/// balancing modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalancingMode {
    /// The model server's own load (custom metrics): KV-cache use and queue, against thresholds.
    /// A soft limit: when every endpoint is past it, the least loaded still serves.
    #[default]
    KvCache,
    /// Requests in flight through this picker, against `max_in_flight_per_endpoint`: a hard cap,
    /// never exceeded; when every endpoint is at it, requests get 429.
    InFlight,
}

/// Settings a policy scope may override for the clusters it selects.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverrides {
    pub capacity_scaler: Option<f64>,
    pub max_in_flight_per_endpoint: Option<u32>,
    pub kv_cache_threshold: Option<f64>,
    pub queue_threshold: Option<u32>,
}

/// A scope: clusters chosen by their labels (all must match), and what changes for them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyScope {
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    pub overrides: PolicyOverrides,
}

/// The backend policy of an imported pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendPolicy {
    pub balancing: BalancingMode,
    /// `kv-cache` mode: an endpoint at or above this KV-cache use is saturated.
    pub kv_cache_threshold: f64,
    /// `kv-cache` mode: ... or with this many requests waiting.
    pub queue_threshold: u32,
    /// `in-flight` mode: the cap per endpoint.
    pub max_in_flight_per_endpoint: u32,
    /// Scales an endpoint's capacity (its thresholds, or its in-flight cap): 0 drains, so no
    /// new request goes there while those in flight finish.
    pub capacity_scaler: f64,
    /// The share of the capacity (as `capacity_scaler` scales it) that sheddable requests
    /// (objective priority below 0) may fill: past it they are refused, and the rest is kept
    /// for everything else. 1: they may fill it all, and are shed only at saturation.
    pub sheddable_capacity: f64,
    /// Compute and report what the policy would do (fleetpick's `/metrics`), but pick as if it
    /// were the default policy.
    pub dry_run: bool,
    /// Overrides for clusters chosen by label; the first matching scope applies.
    pub scopes: Vec<PolicyScope>,
}

impl Default for BackendPolicy {
    fn default() -> Self {
        BackendPolicy {
            balancing: BalancingMode::KvCache,
            // The reference saturation detector's thresholds: KV use 0.8, five waiting.
            kv_cache_threshold: 0.8,
            queue_threshold: 5,
            max_in_flight_per_endpoint: 64,
            capacity_scaler: 1.0,
            sheddable_capacity: 1.0,
            dry_run: false,
            scopes: Vec::new(),
        }
    }
}

/// A pool this picker serves (in the spirit of `InferencePoolImport`: the pools of that name
/// exported by the target clusters, as one), with its backend policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSpec {
    pub pool: String,
    #[serde(default)]
    pub policy: BackendPolicy,
}

fn default_region() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub name: String,
    /// Model names (base models and LoRA adapters) this pool serves.
    pub models: Vec<String>,
    #[serde(default)]
    pub engine: EngineKind,
    /// The port of endpoints listed by IP alone. Optional when an InferencePool of the same
    /// name is among the `manifests`: its `targetPorts` (every port of every IP an endpoint).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Path of the Prometheus page on each endpoint.
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    /// Endpoints per cluster name: `ip` (at `target_port`) or `ip:port`.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
    /// The clusters that export this pool (`inference.networking.x-k8s.io/export`); absent:
    /// every cluster listed under `endpoints`. Endpoints of other clusters are not served.
    #[serde(default)]
    pub exported_from: Option<Vec<String>>,
    /// LoRA adapters the pool's servers load on demand (vLLM `--lora-modules`): served like
    /// `models`, and their requests prefer endpoints already running the adapter (the `lora`
    /// scorer, from `vllm:lora_requests_info`).
    #[serde(default)]
    pub lora_adapters: Vec<String>,
    /// Scorer weights for this pool's requests, in place of `scheduler.weights`.
    #[serde(default)]
    pub weights: Option<Weights>,
    /// Keeps a conversation on one endpoint while it is healthy and not overloaded.
    #[serde(default)]
    pub session_affinity: Option<SessionAffinity>,
}

/// Session affinity: requests carrying the same key go to the endpoint the first of them went
/// to, while that endpoint is in the pick's tier and not overloaded (the prefix scorer's load
/// guard); then the session moves to wherever the next request is picked. The key is a header
/// (remembered by fleetpick, up to `max_sessions`), or a cookie that fleetpick sets and that
/// names the endpoint itself (set again when the session moves; nothing remembered).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionAffinity {
    /// The request header carrying the session key (for example `x-session-id`).
    #[serde(default)]
    pub header: Option<String>,
    /// The session cookie's name; a request without it (or whose session moved) gets it set
    /// on the response.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Header sessions remembered; the least recently used are forgotten first (about 40 bytes
    /// each).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
}

fn default_max_sessions() -> usize {
    65_536
}

/// A client-facing model name served as one or more target models, chosen by weight per
/// request (canary and A/B rollouts), in the spirit of GIE's InferenceModelRewrite. The body's
/// `model` is rewritten to the target on the way in, and the client's name restored in the
/// response (plain JSON and streamed events).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSpec {
    pub model: String,
    pub targets: Vec<RewriteTarget>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteTarget {
    pub model: String,
    /// Relative weight (0 takes the target out of rotation).
    #[serde(default = "default_target_weight")]
    pub weight: u32,
}

fn default_target_weight() -> u32 {
    1
}

fn default_metrics_path() -> String {
    "/metrics".to_string()
}

/// Scorer weights. A weight of 0 switches a scorer off.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Prefers endpoints with free KV cache: score `1 - kv_usage`.
    pub kv_cache: f64,
    /// Prefers short queues: waiting requests, scaled between the candidates' min and max.
    pub queue: f64,
    /// Prefers endpoints with fewer requests in flight through this picker (current between
    /// polls), scaled like the queue.
    pub in_flight: f64,
    /// Prefers endpoints with fewer of this picker's requests still waiting for their first
    /// token (queued or in prefill), scaled like the queue: a new request there would share its
    /// prefill steps with theirs.
    pub prefill: f64,
    /// Prefers endpoints nearer the picker: `1 - rtt / 100 ms`, the cluster's round trip in
    /// 5 ms steps (an absolute scale, so that sub-millisecond differences inside a region do
    /// not count as much as a continent).
    pub rtt: f64,
    /// Prefers endpoints that hold the request's prompt prefix in their KV cache (as this
    /// picker's index remembers its own picks): half the matched share of the prompt, half the
    /// matched length up to 1,024 tokens, so a long shared prefix counts even in a long prompt.
    /// An endpoint whose queue is well above the others' gets no prefix credit (the load guard),
    /// so a hot prefix spreads to a second holder instead of piling up.
    pub prefix: f64,
    /// For requests naming a LoRA adapter (a pool's `lora_adapters`): 1 where the adapter is
    /// running, 0.6 with a free adapter slot, 0.3 where it is waiting for one, else 0.
    pub lora: f64,
}

impl Weights {
    /// Each weight by its name in the fleet file.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("kv_cache", self.kv_cache),
            ("queue", self.queue),
            ("in_flight", self.in_flight),
            ("prefill", self.prefill),
            ("rtt", self.rtt),
            ("prefix", self.prefix),
            ("lora", self.lora),
        ]
    }

    pub fn total(&self) -> f64 {
        self.named().iter().map(|(_, w)| w).sum()
    }
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            kv_cache: 1.0,
            queue: 2.0,
            in_flight: 2.0,
            prefill: 3.0,
            rtt: 1.0,
            prefix: 6.0,
            lora: 4.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    pub weights: Weights,
    /// Endpoints listed after the primary, for Envoy's retries to walk down. Only for an Envoy
    /// that reads a list (`envoy-fallback.yaml`, override_host): an ORIGINAL_DST cluster
    /// (`envoy.yaml`) takes exactly one `ip:port` and answers 503 to a list.
    pub fallbacks: usize,
    /// A cluster whose endpoints all failed or went stale comes back only after it has had
    /// fresh endpoints for this long, so that a flapping cluster does not take traffic in
    /// between failures.
    pub cluster_recovery_ms: u64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            weights: Weights::default(),
            fallbacks: 0,
            cluster_recovery_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollerSettings {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Data older than this makes an endpoint ineligible.
    pub stale_after_ms: u64,
    /// Longest wait between scrapes of a failing endpoint (the wait doubles per failure).
    pub backoff_max_ms: u64,
}

impl Default for PollerSettings {
    fn default() -> Self {
        PollerSettings {
            interval_ms: 50,
            timeout_ms: 1000,
            stale_after_ms: 500,
            backoff_max_ms: 1000,
        }
    }
}

/// The fleet file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    #[serde(default)]
    pub server: ServerSettings,
    /// Kubernetes manifest files (relative to the fleet file): InferencePools give pools their
    /// target ports and export status, InferenceObjectives their priorities.
    #[serde(default)]
    pub manifests: Vec<String>,
    #[serde(default)]
    pub picker: PickerSite,
    pub clusters: Vec<ClusterSpec>,
    pub pools: Vec<PoolSpec>,
    /// The pools served, each with its backend policy; absent: every pool, default policy.
    #[serde(default)]
    pub imports: Option<Vec<ImportSpec>>,
    #[serde(default)]
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub poller: PollerSettings,
    /// Client-facing model names rewritten to served ones.
    #[serde(default)]
    pub rewrites: Vec<RewriteSpec>,
    /// InferenceObjectives written here (beside those of the manifests).
    #[serde(default)]
    pub objectives: Vec<ObjectiveSpec>,
    /// Holding requests in fleetpick while their pool is saturated (off by default).
    #[serde(default)]
    pub flow_control: FlowControlSettings,
}

/// An InferenceObjective: a workload's priority on a pool. Requests name it with the
/// `x-gateway-inference-objective` header, or take it by their model (`models`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveSpec {
    pub name: String,
    pub pool: String,
    /// Higher is more urgent; unset is 0; negative is sheddable (refused with 429 while the
    /// pool is saturated).
    #[serde(default)]
    pub priority: i32,
    /// Models whose requests take this objective when they name none.
    #[serde(default)]
    pub models: Vec<String>,
}

/// Flow control: while a pool is saturated (no endpoint with headroom under its policy, see
/// the scheduler's `free_slots`), requests wait in fleetpick's queues instead of piling
/// onto model servers, and are released, highest priority first and fairly between flows, as
/// capacity frees.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowControlSettings {
    pub enabled: bool,
    /// Requests waiting per priority band and pool; past it, 429.
    pub max_requests_per_band: usize,
    /// Request body bytes waiting per priority band and pool; past it, 429.
    pub max_bytes_per_band: usize,
    /// Longest wait; past it, 503.
    pub ttl_ms: u64,
}

impl Default for FlowControlSettings {
    fn default() -> Self {
        FlowControlSettings {
            enabled: false,
            max_requests_per_band: 1000,
            max_bytes_per_band: 256 * 1024 * 1024,
            ttl_ms: 30_000,
        }
    }
}

/// Weights are relative; this bound keeps their weighted sums finite.
const MAX_WEIGHT: f64 = 1e6;

/// One endpoint, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub cluster: usize,
    pub pool: usize,
}

/// A pool's policy as it applies in one cluster (scopes resolved).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterPolicy {
    pub balancing: BalancingMode,
    pub kv_cache_threshold: f64,
    pub queue_threshold: u32,
    pub max_in_flight_per_endpoint: u32,
    pub capacity_scaler: f64,
    pub sheddable_capacity: f64,
}

impl ClusterPolicy {
    fn resolve(policy: &BackendPolicy, labels: &BTreeMap<String, String>) -> ClusterPolicy {
        let scope = policy.scopes.iter().find(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
        });
        let o = scope.map(|s| s.overrides.clone()).unwrap_or_default();
        ClusterPolicy {
            balancing: policy.balancing,
            kv_cache_threshold: o.kv_cache_threshold.unwrap_or(policy.kv_cache_threshold),
            queue_threshold: o.queue_threshold.unwrap_or(policy.queue_threshold),
            max_in_flight_per_endpoint: o
                .max_in_flight_per_endpoint
                .unwrap_or(policy.max_in_flight_per_endpoint),
            capacity_scaler: o.capacity_scaler.unwrap_or(policy.capacity_scaler),
            sheddable_capacity: policy.sheddable_capacity,
        }
    }
}

/// A validated fleet file.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub file: FleetFile,
    /// The endpoints served: those of imported pools, in clusters that export them.
    pub endpoints: Vec<EndpointSpec>,
    /// Per pool: `None` if it is not imported, else its policy per cluster (by cluster index)
    /// and whether it is a dry run.
    pub policies: Vec<Option<PoolPolicy>>,
    /// The InferenceObjectives of the manifests and of the fleet file (their pools checked).
    pub objectives: Vec<ObjectiveManifest>,
}

/// An imported pool's policy, resolved per cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPolicy {
    pub per_cluster: Vec<ClusterPolicy>,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_norway::Error,
    },
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    #[error("{path}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: String,
        line: Option<usize>,
        field: String,
        message: String,
    },
}

/// A step of a field path: a mapping key or a list index.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Finds the 1-based line of a field path in block-style YAML: enough to point a person at the
/// right place. Flow style (`{a: 1}`) finds the enclosing line or nothing.
fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    // Each line as (line number, indent of its content, content), with a list item's `- `
    // counted as indentation so that `- name: x` reads as the key `name` one level in.
    let lines: Vec<(usize, usize, &str, bool)> = text
        .lines()
        .enumerate()
        .filter_map(|(n, l)| {
            let content = l.trim_start();
            if content.is_empty() || content.starts_with('#') {
                return None;
            }
            let indent = l.len() - content.len();
            match content.strip_prefix("- ") {
                Some(rest) => Some((n + 1, indent + 2, rest.trim_start(), true)),
                None => Some((n + 1, indent, content, false)),
            }
        })
        .collect();
    let (mut lo, mut hi) = (0usize, lines.len());
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for seg in path {
        let inside = |i: usize| parent_indent.is_none_or(|p| lines[i].1 > p);
        // Direct children sit at the indent of the first line inside the block.
        let child_indent = (lo..hi).find(|&i| inside(i)).map(|i| lines[i].1);
        let hit = match seg {
            Seg::Key(k) => (lo..hi).find(|&i| {
                Some(lines[i].1) == child_indent && {
                    let c = lines[i].2;
                    let c = c.strip_prefix('"').unwrap_or(c);
                    c.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with("\":"))
                }
            }),
            Seg::Index(n) => {
                let items: Vec<usize> = (lo..hi).filter(|&i| inside(i) && lines[i].3).collect();
                let first_indent = items.first().map(|&i| lines[i].1);
                items
                    .into_iter()
                    .filter(|&i| Some(lines[i].1) == first_indent)
                    .nth(*n)
            }
        };
        // Not found below here (flow style, say): the enclosing line is the best answer.
        let Some(hit) = hit else {
            break;
        };
        let indent = lines[hit].1;
        let is_item = matches!(seg, Seg::Index(_));
        // The block of this node: following lines indented deeper (for a list item, lines at
        // the item's content indent belong to it too).
        let end = (hit + 1..hi)
            .find(|&i| {
                if is_item {
                    lines[i].1 < indent || (lines[i].1 == indent && lines[i].3)
                } else {
                    lines[i].1 <= indent
                }
            })
            .unwrap_or(hi);
        found = Some(lines[hit].0);
        if is_item {
            // Keys of the item sit at `indent`; the first may be on the item's own line.
            lo = hit;
            parent_indent = indent.checked_sub(1);
        } else {
            lo = hit + 1;
            parent_indent = Some(indent);
        }
        hi = end;
    }
    found
}

struct Checker<'a> {
    path: &'a str,
    text: &'a str,
}

impl Checker<'_> {
    fn err(&self, field: &[Seg], message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            line: locate(self.text, field),
            field: render_path(field),
            message: message.into(),
        }
    }
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

impl FleetConfig {
    pub fn load(path: &Path) -> Result<FleetConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        FleetConfig::parse(&text, &path.display().to_string())
    }

    /// Checks that `region` (the picker's, from the command line) is some cluster's region: a
    /// mistyped one would make every cluster remote and silently lose the local preference.
    pub fn check_region(&self, region: &str) -> Result<(), ConfigError> {
        if self.file.clusters.iter().any(|c| c.region == region) {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            path: "--region".into(),
            line: None,
            field: "picker.region".into(),
            message: format!(
                "`{region}` is not the region of any cluster ({})",
                regions_of(&self.file)
            ),
        })
    }

    /// Parses and validates fleet-file text; `path` names it in messages, and the manifests
    /// it lists are read relative to `path`'s directory.
    pub fn parse(text: &str, path: &str) -> Result<FleetConfig, ConfigError> {
        let file: FleetFile =
            serde_norway::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_string(),
                source,
            })?;
        let base = Path::new(path).parent().unwrap_or(Path::new(""));
        let manifests = manifests::load(&file.manifests, base)?;
        let c = Checker { path, text };
        validate(&file, &manifests, &c)
    }
}

fn validate(
    file: &FleetFile,
    manifests: &Manifests,
    c: &Checker<'_>,
) -> Result<FleetConfig, ConfigError> {
    if file.clusters.is_empty() {
        return Err(c.err(&[key("clusters")], "at least one cluster is needed"));
    }
    let mut cluster_index = HashMap::new();
    for (i, cl) in file.clusters.iter().enumerate() {
        let at = [key("clusters"), Seg::Index(i), key("name")];
        if cl.name.is_empty() {
            return Err(c.err(&at, "must not be empty"));
        }
        if cluster_index.insert(cl.name.as_str(), i).is_some() {
            return Err(c.err(&at, format!("cluster `{}` is defined twice", cl.name)));
        }
    }
    for (i, cl) in file.clusters.iter().enumerate() {
        if let Some(rtt) = cl.rtt_ms
            && !(rtt.is_finite() && (0.0..=60_000.0).contains(&rtt))
        {
            return Err(c.err(
                &[key("clusters"), Seg::Index(i), key("rtt_ms")],
                "must be a number of milliseconds from 0 to 60000",
            ));
        }
    }
    if file.pools.is_empty() {
        return Err(c.err(&[key("pools")], "at least one pool is needed"));
    }
    let policies = validate_imports(file, c)?;
    let mut pool_names = HashSet::new();
    let mut model_pool: HashMap<&str, &str> = HashMap::new();
    let mut seen_addrs: HashMap<SocketAddr, String> = HashMap::new();
    let mut endpoints = Vec::new();
    for (p, pool) in file.pools.iter().enumerate() {
        let at = |f: &str| [key("pools"), Seg::Index(p), key(f)];
        if pool.name.is_empty() {
            return Err(c.err(&at("name"), "must not be empty"));
        }
        if !pool_names.insert(pool.name.as_str()) {
            return Err(c.err(
                &at("name"),
                format!("pool `{}` is defined twice", pool.name),
            ));
        }
        if pool.models.is_empty() {
            return Err(c.err(&at("models"), "list at least one model"));
        }
        for (field, m) in pool
            .models
            .iter()
            .map(|m| ("models", m))
            .chain(pool.lora_adapters.iter().map(|m| ("lora_adapters", m)))
        {
            if m.is_empty() {
                return Err(c.err(&at(field), "model names must not be empty"));
            }
            if let Some(other) = model_pool.insert(m.as_str(), pool.name.as_str()) {
                return Err(c.err(
                    &at(field),
                    format!("model `{m}` is served by pool `{other}` already: a model belongs to one pool"),
                ));
            }
        }
        if let Some(w) = &pool.weights {
            check_weights(w, &at("weights"), c)?;
        }
        if let Some(sa) = &pool.session_affinity {
            check_session_affinity(sa, &at("session_affinity"), c)?;
        }
        let manifest = manifests.pools.iter().find(|m| m.name == pool.name);
        let ports: Vec<u16> = match (pool.target_port, manifest) {
            (Some(0), _) => {
                return Err(c.err(&at("target_port"), "must be a port number, 1 to 65535"));
            }
            (Some(p), Some(m)) if !m.target_ports.contains(&p) => {
                return Err(c.err(
                    &at("target_port"),
                    format!(
                        "{p} is not among the targetPorts {:?} of InferencePool `{}` in {}",
                        m.target_ports, m.name, m.source
                    ),
                ));
            }
            (Some(p), _) => vec![p],
            (None, Some(m)) => m.target_ports.clone(),
            (None, None) => {
                return Err(c.err(
                    &at("name"),
                    format!(
                        "pool `{}` needs a target_port, or an InferencePool of that name among the manifests",
                        pool.name
                    ),
                ));
            }
        };
        if let Some(m) = manifest
            && !m.exported
            && pool.exported_from.is_none()
            && pool.endpoints.len() > 1
        {
            return Err(c.err(
                &at("endpoints"),
                format!(
                    "InferencePool `{}` ({}) is not exported (annotation {}: ClusterSet), so it serves in one cluster only: list its endpoints under one cluster, set exported_from, or export it",
                    m.name,
                    m.source,
                    manifests::EXPORT_ANNOTATION
                ),
            ));
        }
        if !pool.metrics_path.starts_with('/') {
            return Err(c.err(&at("metrics_path"), "must start with `/`"));
        }
        let known = || {
            file.clusters
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for name in pool.exported_from.iter().flatten() {
            if !cluster_index.contains_key(name.as_str()) {
                return Err(c.err(
                    &at("exported_from"),
                    format!("no cluster named `{name}` (clusters: {})", known()),
                ));
            }
        }
        for cluster in pool.endpoints.keys() {
            if !cluster_index.contains_key(cluster.as_str()) {
                return Err(c.err(
                    &[key("pools"), Seg::Index(p), key("endpoints"), key(cluster)],
                    format!("no cluster named `{cluster}` (clusters: {})", known()),
                ));
            }
        }
        // Endpoints in the order the clusters are declared.
        for (ci, cluster, addrs) in file
            .clusters
            .iter()
            .enumerate()
            .filter_map(|(ci, cl)| pool.endpoints.get(&cl.name).map(|a| (ci, &cl.name, a)))
        {
            let field = [key("pools"), Seg::Index(p), key("endpoints"), key(cluster)];
            let served = policies[p].is_some()
                && pool
                    .exported_from
                    .as_ref()
                    .is_none_or(|e| e.iter().any(|n| n == cluster));
            for a in addrs {
                let addrs = parse_endpoint(a, &ports).ok_or_else(|| {
                    c.err(&field, format!("`{a}` is not an IP address or ip:port"))
                })?;
                for addr in addrs {
                    let owner = format!("pool `{}`, cluster `{cluster}`", pool.name);
                    if let Some(prev) = seen_addrs.insert(addr, owner) {
                        return Err(c.err(
                            &field,
                            format!("endpoint {addr} is listed twice (also in {prev})"),
                        ));
                    }
                    if served {
                        endpoints.push(EndpointSpec {
                            addr,
                            cluster: ci,
                            pool: p,
                        });
                    }
                }
            }
        }
    }
    let mut objectives = manifests.objectives.clone();
    for (i, o) in file.objectives.iter().enumerate() {
        let at = |f: &str| [key("objectives"), Seg::Index(i), key(f)];
        if o.name.is_empty() {
            return Err(c.err(&at("name"), "must not be empty"));
        }
        if objectives.iter().any(|m| m.name == o.name) {
            return Err(c.err(
                &at("name"),
                format!("objective `{}` is defined twice", o.name),
            ));
        }
        let Some(pool) = file.pools.iter().find(|p| p.name == o.pool) else {
            return Err(c.err(&at("pool"), format!("no pool named `{}`", o.pool)));
        };
        for m in &o.models {
            if !pool.models.contains(m) && !pool.lora_adapters.contains(m) {
                return Err(c.err(
                    &at("models"),
                    format!("pool `{}` does not serve `{m}`", o.pool),
                ));
            }
            if let Some(other) = file
                .objectives
                .iter()
                .take(i)
                .find(|x| x.models.contains(m))
            {
                return Err(c.err(
                    &at("models"),
                    format!("`{m}` takes objective `{}` already", other.name),
                ));
            }
        }
        objectives.push(ObjectiveManifest {
            name: o.name.clone(),
            priority: o.priority,
            pool: o.pool.clone(),
            source: "the fleet file".into(),
        });
    }
    let fc = &file.flow_control;
    if fc.max_requests_per_band == 0 {
        return Err(c.err(
            &[key("flow_control"), key("max_requests_per_band")],
            "must be at least 1",
        ));
    }
    if fc.max_bytes_per_band < file.server.max_body_bytes {
        return Err(c.err(
            &[key("flow_control"), key("max_bytes_per_band")],
            format!(
                "must be at least server.max_body_bytes ({}), or a large request could never wait",
                file.server.max_body_bytes
            ),
        ));
    }
    if !(1..=3_600_000).contains(&fc.ttl_ms) {
        return Err(c.err(
            &[key("flow_control"), key("ttl_ms")],
            "must be from 1 to 3600000 (an hour)",
        ));
    }
    let limit = fleetpick_protocol::envoy::MESSAGE_TIMEOUT_MS;
    if fc.enabled && file.server.body_mode == BodyMode::Buffered && fc.ttl_ms >= limit {
        return Err(c.err(
            &[key("flow_control"), key("ttl_ms")],
            format!(
                "must be below {limit} with server.body_mode buffered: Envoy gives up on an answer after {limit} ms (message_timeout) in that mode"
            ),
        ));
    }
    for (i, o) in manifests.objectives.iter().enumerate() {
        if !file.pools.iter().any(|p| p.name == o.pool) {
            return Err(c.err(
                &[key("manifests")],
                format!(
                    "InferenceObjective `{}` ({}, objective {}) refers to pool `{}`, which the fleet file does not define",
                    o.name,
                    o.source,
                    i + 1,
                    o.pool
                ),
            ));
        }
    }
    if let Some(region) = &file.picker.region
        && !file.clusters.iter().any(|cl| &cl.region == region)
    {
        return Err(c.err(
            &[key("picker"), key("region")],
            format!(
                "`{region}` is not the region of any cluster ({}): every cluster would be remote",
                regions_of(file)
            ),
        ));
    }
    for (p, pool) in file.pools.iter().enumerate() {
        if policies[p].is_some() && !endpoints.iter().any(|e: &EndpointSpec| e.pool == p) {
            return Err(c.err(
                &[key("pools"), Seg::Index(p), key("endpoints")],
                format!(
                    "pool `{}` is imported but has no endpoints served (check endpoints and exported_from)",
                    pool.name
                ),
            ));
        }
    }
    check_weights(
        &file.scheduler.weights,
        &[key("scheduler"), key("weights")],
        c,
    )?;
    check_rewrites(file, &model_pool, &policies, c)?;
    let p = &file.poller;
    for (name, v) in [
        ("interval_ms", p.interval_ms),
        ("timeout_ms", p.timeout_ms),
        ("stale_after_ms", p.stale_after_ms),
        ("backoff_max_ms", p.backoff_max_ms),
    ] {
        if v == 0 {
            return Err(c.err(&[key("poller"), key(name)], "must be at least 1"));
        }
    }
    if p.stale_after_ms < p.interval_ms {
        return Err(c.err(
            &[key("poller"), key("stale_after_ms")],
            format!(
                "must be at least interval_ms ({}), or every endpoint goes stale between polls",
                p.interval_ms
            ),
        ));
    }
    if file.server.shutdown_grace_ms > 600_000 {
        return Err(c.err(
            &[key("server"), key("shutdown_grace_ms")],
            "must be at most 600000 (ten minutes)",
        ));
    }
    if file.server.max_body_bytes == 0 {
        return Err(c.err(
            &[key("server"), key("max_body_bytes")],
            "must be at least 1",
        ));
    }
    if file.scheduler.cluster_recovery_ms > 600_000 {
        return Err(c.err(
            &[key("scheduler"), key("cluster_recovery_ms")],
            "must be at most 600000 (ten minutes)",
        ));
    }
    Ok(FleetConfig {
        file: file.clone(),
        endpoints,
        policies,
        objectives,
    })
}

fn check_weights(w: &Weights, at: &[Seg], c: &Checker<'_>) -> Result<(), ConfigError> {
    for (name, v) in w.named() {
        if !(v.is_finite() && (0.0..=MAX_WEIGHT).contains(&v)) {
            let mut field = at.to_vec();
            field.push(key(name));
            return Err(c.err(&field, format!("must be a number from 0 to {MAX_WEIGHT}")));
        }
    }
    if w.total() <= 0.0 {
        return Err(c.err(at, "at least one weight must be above 0"));
    }
    Ok(())
}

/// A header or cookie name: an HTTP token (RFC 9110), so that it can be matched and set.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_session_affinity(
    sa: &SessionAffinity,
    at: &[Seg],
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    let field = |k: &str| {
        let mut f = at.to_vec();
        f.push(key(k));
        f
    };
    match (&sa.header, &sa.cookie) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(c.err(at, "set exactly one of `header` and `cookie`"));
        }
        (Some(h), None) if !is_token(h) || h.starts_with(':') => {
            return Err(c.err(
                &field("header"),
                format!("`{h}` is not an HTTP header name"),
            ));
        }
        (None, Some(k)) if !is_token(k) => {
            return Err(c.err(&field("cookie"), format!("`{k}` is not a cookie name")));
        }
        _ => {}
    }
    if !(1..=10_000_000).contains(&sa.max_sessions) {
        return Err(c.err(&field("max_sessions"), "must be from 1 to 10000000"));
    }
    Ok(())
}

fn check_rewrites(
    file: &FleetFile,
    served: &HashMap<&str, &str>,
    policies: &[Option<PoolPolicy>],
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, r) in file.rewrites.iter().enumerate() {
        let at = |f: &str| [key("rewrites"), Seg::Index(i), key(f)];
        if r.model.is_empty() {
            return Err(c.err(&at("model"), "must not be empty"));
        }
        if !seen.insert(r.model.as_str()) {
            return Err(c.err(&at("model"), format!("`{}` is rewritten twice", r.model)));
        }
        if r.targets.is_empty() {
            return Err(c.err(&at("targets"), "list at least one target"));
        }
        for (j, t) in r.targets.iter().enumerate() {
            let target = |f: &str| {
                [
                    key("rewrites"),
                    Seg::Index(i),
                    key("targets"),
                    Seg::Index(j),
                    key(f),
                ]
            };
            let Some(pool) = served.get(t.model.as_str()) else {
                return Err(c.err(
                    &target("model"),
                    format!("`{}` is not a model or adapter of any pool", t.model),
                ));
            };
            // A pool that is not imported serves nothing: every rewritten request would fail.
            let imported = file
                .pools
                .iter()
                .zip(policies)
                .any(|(p, policy)| p.name == *pool && policy.is_some());
            if !imported {
                return Err(c.err(
                    &target("model"),
                    format!(
                        "`{}` is served by pool `{pool}`, which is not imported",
                        t.model
                    ),
                ));
            }
            if t.weight > 1_000_000 {
                return Err(c.err(&target("weight"), "must be at most 1000000"));
            }
        }
        if r.targets.iter().all(|t| t.weight == 0) {
            return Err(c.err(&at("targets"), "at least one weight must be above 0"));
        }
    }
    Ok(())
}

/// The distinct regions of the clusters, for messages.
fn regions_of(file: &FleetFile) -> String {
    let set: std::collections::BTreeSet<&str> =
        file.clusters.iter().map(|c| c.region.as_str()).collect();
    set.into_iter().collect::<Vec<_>>().join(", ")
}

/// Checks `imports` and resolves each imported pool's policy per cluster.
fn validate_imports(
    file: &FleetFile,
    c: &Checker<'_>,
) -> Result<Vec<Option<PoolPolicy>>, ConfigError> {
    let resolve = |policy: &BackendPolicy| PoolPolicy {
        per_cluster: file
            .clusters
            .iter()
            .map(|cl| ClusterPolicy::resolve(policy, &cl.labels))
            .collect(),
        dry_run: policy.dry_run,
    };
    let Some(imports) = &file.imports else {
        return Ok(vec![
            Some(resolve(&BackendPolicy::default()));
            file.pools.len()
        ]);
    };
    if imports.is_empty() {
        return Err(c.err(
            &[key("imports")],
            "list at least one pool, or leave imports out to serve every pool",
        ));
    }
    let mut out = vec![None; file.pools.len()];
    for (i, imp) in imports.iter().enumerate() {
        let at = |f: &str| vec![key("imports"), Seg::Index(i), key(f)];
        let Some(p) = file.pools.iter().position(|p| p.name == imp.pool) else {
            let known: Vec<&str> = file.pools.iter().map(|p| p.name.as_str()).collect();
            return Err(c.err(
                &at("pool"),
                format!("no pool named `{}` (pools: {})", imp.pool, known.join(", ")),
            ));
        };
        if out[p].is_some() {
            return Err(c.err(
                &at("pool"),
                format!("pool `{}` is imported twice", imp.pool),
            ));
        }
        let pol = &imp.policy;
        let field = |f: &str| {
            let mut v = at("policy");
            v.push(key(f));
            v
        };
        check_policy_values(
            c,
            &field(""),
            &PolicyOverrides {
                capacity_scaler: Some(pol.capacity_scaler),
                max_in_flight_per_endpoint: Some(pol.max_in_flight_per_endpoint),
                kv_cache_threshold: Some(pol.kv_cache_threshold),
                queue_threshold: Some(pol.queue_threshold),
            },
        )?;
        if !(pol.sheddable_capacity.is_finite()
            && pol.sheddable_capacity > 0.0
            && pol.sheddable_capacity <= 1.0)
        {
            return Err(c.err(
                &field("sheddable_capacity"),
                "must be above 0 and at most 1 (a share of the capacity)",
            ));
        }
        for (s, scope) in pol.scopes.iter().enumerate() {
            let mut sf = field("scopes");
            sf.push(Seg::Index(s));
            if scope.match_labels.is_empty() {
                let mut f = sf.clone();
                f.push(key("match_labels"));
                return Err(c.err(
                    &f,
                    "name at least one label (a scope without labels would select every cluster)",
                ));
            }
            check_policy_values(c, &sf, &scope.overrides)?;
        }
        out[p] = Some(resolve(pol));
    }
    Ok(out)
}

/// Range checks shared by a policy and its scopes; `at` ends in an empty key for the policy
/// itself (replaced by the field's name).
fn check_policy_values(
    c: &Checker<'_>,
    at: &[Seg],
    o: &PolicyOverrides,
) -> Result<(), ConfigError> {
    let field = |name: &str| {
        let mut v: Vec<Seg> = at
            .iter()
            .filter(|s| !matches!(s, Seg::Key(k) if k.is_empty()))
            .cloned()
            .collect();
        v.push(key(name));
        v
    };
    if let Some(v) = o.capacity_scaler
        && !(v.is_finite() && (0.0..=1000.0).contains(&v))
    {
        return Err(c.err(
            &field("capacity_scaler"),
            "must be a number from 0 (drain) to 1000",
        ));
    }
    if let Some(v) = o.kv_cache_threshold
        && !(v.is_finite() && v > 0.0 && v <= 1.0)
    {
        return Err(c.err(
            &field("kv_cache_threshold"),
            "must be above 0 and at most 1 (a share of the KV cache)",
        ));
    }
    if o.queue_threshold == Some(0) {
        return Err(c.err(&field("queue_threshold"), "must be at least 1"));
    }
    if o.max_in_flight_per_endpoint == Some(0) {
        return Err(c.err(
            &field("max_in_flight_per_endpoint"),
            "must be at least 1 (drain a cluster with capacity_scaler: 0)",
        ));
    }
    Ok(())
}

/// `ip:port` (IPv6 as `[ip]:port`): one endpoint; `ip`: one endpoint per target port.
fn parse_endpoint(s: &str, ports: &[u16]) -> Option<Vec<SocketAddr>> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return (a.port() != 0).then(|| vec![a]);
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| ports.iter().map(|&p| SocketAddr::new(ip, p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
clusters:
  - name: east
    region: us-east1
  - name: west
pools:
  - name: llama
    models: [m1, lora-a]
    target_port: 8000
    endpoints:
      east: [10.0.0.1, \"10.0.0.2:8001\"]
      west:
        - 10.1.0.1
  - name: other
    models: [m2]
    engine: sglang
    target_port: 30000
    endpoints:
      west: [10.1.0.9]
scheduler:
  fallbacks: 1
";

    fn err(text: &str) -> String {
        FleetConfig::parse(text, "fleet.yaml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_file_resolves_endpoints() {
        let cfg = FleetConfig::parse(GOOD, "fleet.yaml").unwrap();
        let addrs: Vec<String> = cfg.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            addrs,
            vec![
                "10.0.0.1:8000",
                "10.0.0.2:8001",
                "10.1.0.1:8000",
                "10.1.0.9:30000"
            ]
        );
        assert_eq!(cfg.endpoints[2].cluster, 1);
        assert_eq!(cfg.endpoints[3].pool, 1);
        assert_eq!(cfg.file.pools[1].engine, EngineKind::Sglang);
        assert_eq!(cfg.file.clusters[1].region, "default");
        assert_eq!(cfg.file.scheduler.fallbacks, 1);
        assert_eq!(cfg.file.poller.interval_ms, 50);
    }

    #[test]
    fn unknown_cluster_names_field_and_line() {
        let text = GOOD.replace(
            "      west:\n        - 10.1.0.1",
            "      north:\n        - 10.1.0.1",
        );
        let e = err(&text);
        assert!(
            e.contains("fleet.yaml:11: pools[0].endpoints.north: no cluster named `north`"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_model_and_endpoint_are_refused() {
        let e = err(&GOOD.replace("models: [m2]", "models: [m1]"));
        assert!(
            e.contains("pools[1].models") && e.contains("`m1`") && e.contains(":14:"),
            "{e}"
        );
        let e = err(&GOOD.replace("west: [10.1.0.9]", "west: [\"10.1.0.1:8000\"]"));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&GOOD.replace("10.1.0.9", "not-an-ip"));
        assert!(
            e.contains("pools[1].endpoints.west") && e.contains("not-an-ip"),
            "{e}"
        );
    }

    #[test]
    fn adapters_rewrites_weights_and_sessions_are_checked() {
        let ok = GOOD.replace(
            "models: [m1, lora-a]",
            "models: [m1]\n    lora_adapters: [lora-a]\n    weights: {prefix: 0}\n    session_affinity: {cookie: fp-session}",
        );
        let cfg = FleetConfig::parse(
            &format!("{ok}rewrites:\n  - model: chat\n    targets: [{{model: m1, weight: 9}}, {{model: lora-a}}]\n"),
            "t",
        )
        .unwrap();
        assert_eq!(cfg.file.pools[0].lora_adapters, vec!["lora-a".to_string()]);
        assert_eq!(cfg.file.pools[0].weights.unwrap().prefix, 0.0);
        assert_eq!(cfg.file.pools[0].weights.unwrap().kv_cache, 1.0);
        assert_eq!(cfg.file.rewrites[0].targets[1].weight, 1);
        // An adapter is a model: one pool only.
        let e = err(&ok.replace("models: [m2]", "models: [m2]\n    lora_adapters: [lora-a]"));
        assert!(
            e.contains("pools[1].lora_adapters") && e.contains("`lora-a`"),
            "{e}"
        );
        let e = err(&ok.replace("weights: {prefix: 0}", "weights: {prefix: -1}"));
        assert!(e.contains("pools[0].weights.prefix"), "{e}");
        let e = err(&ok.replace("{cookie: fp-session}", "{cookie: a, header: b}"));
        assert!(
            e.contains("pools[0].session_affinity") && e.contains("exactly one"),
            "{e}"
        );
        let e = err(&ok.replace("{cookie: fp-session}", "{header: \"x id\"}"));
        assert!(e.contains("session_affinity.header"), "{e}");
        for (rewrite, field, says) in [
            (
                "{model: chat, targets: [{model: nope}]}",
                "rewrites[0].targets",
                "`nope`",
            ),
            (
                "{model: chat, targets: []}",
                "rewrites[0].targets",
                "at least one",
            ),
            (
                "{model: chat, targets: [{model: m1, weight: 0}]}",
                "rewrites[0].targets",
                "above 0",
            ),
            (
                "{model: \"\", targets: [{model: m1}]}",
                "rewrites[0].model",
                "empty",
            ),
        ] {
            let e = err(&format!("{ok}rewrites:\n  - {rewrite}\n"));
            assert!(e.contains(field) && e.contains(says), "{e}");
        }
        // A target in a pool that is not imported: every request for it would fail.
        let e = err(&format!(
            "{ok}imports: [{{pool: llama}}]\nrewrites:\n  - {{model: chat, targets: [{{model: m2}}]}}\n"
        ));
        assert!(
            e.contains("rewrites[0].targets[0].model") && e.contains("not imported"),
            "{e}"
        );
        let e = err(&format!(
            "{ok}rewrites:\n  - {{model: chat, targets: [{{model: m1, weight: 2000000}}]}}\n"
        ));
        assert!(e.contains("rewrites[0].targets[0].weight"), "{e}");
        let e = err(&format!(
            "{ok}rewrites:\n  - {{model: c, targets: [{{model: m1}}]}}\n  - {{model: c, targets: [{{model: m2}}]}}\n"
        ));
        assert!(
            e.contains("rewrites[1].model") && e.contains("twice"),
            "{e}"
        );
    }

    #[test]
    fn objectives_and_flow_control_are_checked() {
        let ok = format!(
            "{GOOD}objectives:\n  - {{name: chat, pool: llama, priority: 5, models: [m1]}}\n  - {{name: batch, pool: other, priority: -2}}\nflow_control: {{enabled: true, ttl_ms: 5000}}\n"
        );
        let cfg = FleetConfig::parse(&ok, "t").unwrap();
        let names: Vec<(&str, i32)> = cfg
            .objectives
            .iter()
            .map(|o| (o.name.as_str(), o.priority))
            .collect();
        assert_eq!(names, [("chat", 5), ("batch", -2)]);
        assert!(cfg.file.flow_control.enabled);
        assert_eq!(cfg.file.flow_control.max_requests_per_band, 1000);
        for (from, to, field, says) in [
            (
                "pool: llama, priority: 5",
                "pool: nope, priority: 5",
                "objectives[0].pool",
                "`nope`",
            ),
            (
                "models: [m1]",
                "models: [m2]",
                "objectives[0].models",
                "does not serve",
            ),
            ("name: batch", "name: chat", "objectives[1].name", "twice"),
            ("ttl_ms: 5000", "ttl_ms: 0", "flow_control.ttl_ms", "from 1"),
            (
                "ttl_ms: 5000}",
                "ttl_ms: 20000}\nserver: {body_mode: buffered}",
                "flow_control.ttl_ms",
                "message_timeout",
            ),
            (
                "ttl_ms: 5000",
                "max_requests_per_band: 0",
                "flow_control",
                "at least 1",
            ),
            (
                "ttl_ms: 5000",
                "max_bytes_per_band: 1000",
                "flow_control.max_bytes_per_band",
                "server.max_body_bytes",
            ),
        ] {
            let e = err(&ok.replace(from, to));
            assert!(e.contains(field) && e.contains(says), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn type_errors_and_unknown_fields_have_positions() {
        let e = err(&GOOD.replace("target_port: 30000", "target_port: many"));
        assert!(e.contains("line 16"), "{e}");
        let e = err(&GOOD.replace("  fallbacks: 1", "  fallback: 1"));
        assert!(e.contains("fallback") && e.contains("line 20"), "{e}");
        let e = err(&format!(
            "{GOOD}poller:\n  interval_ms: 100\n  stale_after_ms: 50\n"
        ));
        assert!(e.contains("fleet.yaml:23: poller.stale_after_ms"), "{e}");
        let e = err(&format!(
            "{GOOD}  weights: {{kv_cache: 0, queue: 0, in_flight: 0, prefill: 0, rtt: 0, prefix: 0, lora: 0}}\n"
        ));
        assert!(e.contains("scheduler.weights"), "{e}");
    }

    #[test]
    fn locate_handles_list_items() {
        let text = "a:\n  - name: x\n    v: 1\n  - name: y\n    v: 2\nb: 3\n";
        let path = [key("a"), Seg::Index(1), key("v")];
        assert_eq!(locate(text, &path), Some(5));
        assert_eq!(
            locate(text, &[key("a"), Seg::Index(0), key("name")]),
            Some(2)
        );
        assert_eq!(locate(text, &[key("b")]), Some(6));
        assert_eq!(locate(text, &[key("zz")]), None);
        // Flow style: the enclosing line.
        assert_eq!(
            locate("s:\n  w: {a: -1}\n", &[key("s"), key("w"), key("a")]),
            Some(2)
        );
        // Only direct children match: a deeper `name` comes first here.
        let text = "c:\n  - labels:\n      name: y\n    name: a\n";
        assert_eq!(
            locate(text, &[key("c"), Seg::Index(0), key("name")]),
            Some(4)
        );
    }

    #[test]
    fn huge_weights_are_refused() {
        let e = err(&format!(
            "{GOOD}  weights: {{kv_cache: 1e308, queue: 1e308}}\n"
        ));
        assert!(
            e.contains("scheduler.weights.kv_cache") && e.contains(":21:"),
            "{e}"
        );
    }

    #[test]
    fn imports_policies_and_scopes_resolve_per_cluster() {
        let text = GOOD.replace(
            "  - name: west\n",
            "  - name: west\n    labels: {gpu: l4}\n    rtt_ms: 40\n",
        ) + "imports:\n  - pool: llama\n    policy:\n      balancing: in-flight\n      max_in_flight_per_endpoint: 8\n      scopes:\n        - {match_labels: {gpu: l4}, capacity_scaler: 0.5}\n";
        let cfg = FleetConfig::parse(&text, "fleet.yaml").unwrap();
        // `other` is not imported: its endpoint is not served.
        assert_eq!(cfg.endpoints.len(), 3);
        assert!(cfg.policies[1].is_none());
        let p = cfg.policies[0].as_ref().unwrap();
        assert_eq!(p.per_cluster[0].capacity_scaler, 1.0);
        assert_eq!(p.per_cluster[1].capacity_scaler, 0.5);
        assert_eq!(p.per_cluster[1].max_in_flight_per_endpoint, 8);
        assert_eq!(p.per_cluster[1].balancing, BalancingMode::InFlight);
        assert_eq!(cfg.file.clusters[1].rtt_ms, Some(40.0));
        // Without imports, every pool is served with the default policy.
        let all = FleetConfig::parse(GOOD, "fleet.yaml").unwrap();
        assert!(
            all.policies
                .iter()
                .all(|p| p.as_ref().is_some_and(|p| !p.dry_run))
        );
    }

    #[test]
    fn exported_from_limits_the_clusters_served() {
        let text = GOOD.replace(
            "    models: [m1, lora-a]\n",
            "    models: [m1, lora-a]\n    exported_from: [west]\n",
        );
        let cfg = FleetConfig::parse(&text, "fleet.yaml").unwrap();
        let addrs: Vec<String> = cfg.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, vec!["10.1.0.1:8000", "10.1.0.9:30000"]);
        let e = err(&text.replace("exported_from: [west]", "exported_from: [mars]"));
        assert!(
            e.contains("pools[0].exported_from") && e.contains("`mars`"),
            "{e}"
        );
    }

    #[test]
    fn bad_policies_name_their_field() {
        let with = |policy: &str| format!("{GOOD}imports:\n  - pool: llama\n    policy:\n{policy}");
        let e = err(&with("      sheddable_capacity: 0\n"));
        assert!(
            e.contains("imports[0].policy.sheddable_capacity: must be above 0"),
            "{e}"
        );
        let e = err(&with("      capacity_scaler: -1\n"));
        assert!(
            e.contains("imports[0].policy.capacity_scaler: must be a number from 0"),
            "{e}"
        );
        let e = err(&with("      kv_cache_threshold: 1.5\n"));
        assert!(e.contains("imports[0].policy.kv_cache_threshold"), "{e}");
        let e = err(&with("      max_in_flight_per_endpoint: 0\n"));
        assert!(
            e.contains("imports[0].policy.max_in_flight_per_endpoint")
                && e.contains("capacity_scaler: 0"),
            "{e}"
        );
        let e = err(&with(
            "      scopes:\n        - {match_labels: {}, capacity_scaler: 0}\n",
        ));
        assert!(
            e.contains("imports[0].policy.scopes[0].match_labels"),
            "{e}"
        );
        let e = err(&with(
            "      scopes:\n        - {match_labels: {a: b}, queue_threshold: 0}\n",
        ));
        assert!(
            e.contains("imports[0].policy.scopes[0].queue_threshold"),
            "{e}"
        );
        let e = err(&with("      balancing: round-robin\n"));
        assert!(e.contains("round-robin") && e.contains("line"), "{e}");
        let e = err(&format!("{GOOD}imports:\n  - pool: nope\n"));
        assert!(
            e.contains("imports[0].pool: no pool named `nope` (pools: llama, other)"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}imports:\n  - pool: llama\n  - pool: llama\n"
        ));
        assert!(e.contains("imports[1].pool") && e.contains("twice"), "{e}");
        let e = err(&GOOD.replace(
            "    region: us-east1\n",
            "    region: us-east1\n    rtt_ms: -3\n",
        ));
        assert!(e.contains("clusters[0].rtt_ms"), "{e}");
    }

    #[test]
    fn manifests_give_pools_their_ports_and_objectives_their_pools() {
        let dir = std::env::temp_dir().join(format!("fleetpick-manifests-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("k8s")).unwrap();
        std::fs::write(
            dir.join("k8s/pools.yaml"),
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: llama}\nspec: {targetPorts: [{number: 8000}, {number: 8001}], selector: {matchLabels: {a: b}}}\n---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata: {name: chat}\nspec: {priority: 3, poolRef: {name: llama}}\n",
        )
        .unwrap();
        let fleet = |pools: &str| {
            format!(
                "manifests: [k8s/pools.yaml]\nclusters: [{{name: a}}, {{name: b}}]\npools:\n{pools}"
            )
        };
        let path = dir.join("fleet.yaml").display().to_string();
        let cfg = FleetConfig::parse(
            &fleet(
                "  - {name: llama, models: [m], endpoints: {a: [10.0.0.1, \"10.0.0.2:9000\"]}}\n",
            ),
            &path,
        )
        .unwrap();
        let addrs: Vec<String> = cfg.endpoints.iter().map(|e| e.addr.to_string()).collect();
        // An IP alone is one endpoint per target port.
        assert_eq!(
            addrs,
            vec!["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:9000"]
        );
        assert_eq!(cfg.objectives[0].name, "chat");
        assert_eq!(cfg.objectives[0].priority, 3);
        // Not exported: one cluster only.
        let e = FleetConfig::parse(
            &fleet("  - {name: llama, models: [m], endpoints: {a: [10.0.0.1], b: [10.0.1.1]}}\n"),
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pools[0].endpoints") && e.contains("not exported"),
            "{e}"
        );
        let e = FleetConfig::parse(
            &fleet(
                "  - {name: llama, models: [m], target_port: 7000, endpoints: {a: [10.0.0.1]}}\n",
            ),
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("7000 is not among the targetPorts [8000, 8001]"),
            "{e}"
        );
        let e = FleetConfig::parse(
            &fleet(
                "  - {name: other, models: [m], target_port: 7000, endpoints: {a: [10.0.0.1]}}\n",
            ),
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("InferenceObjective `chat`") && e.contains("pool `llama`"),
            "{e}"
        );
        let e = FleetConfig::parse(
            &fleet("  - {name: nope, models: [m], endpoints: {a: [10.0.0.1]}}\n"),
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("needs a target_port"), "{e}");
        let e = FleetConfig::parse(
            "manifests: [missing.yaml]\nclusters: []\npools: []\n",
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read manifest file") && e.contains("missing.yaml"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn regions_and_imports_that_cannot_serve_are_refused() {
        let e = err(&format!("picker: {{region: us-eats1}}\n{GOOD}"));
        assert!(
            e.contains(
                "picker.region: `us-eats1` is not the region of any cluster (default, us-east1)"
            ),
            "{e}"
        );
        let cfg =
            FleetConfig::parse(&format!("picker: {{region: us-east1}}\n{GOOD}"), "f").unwrap();
        assert!(cfg.check_region("us-east1").is_ok());
        assert!(
            cfg.check_region("mars")
                .unwrap_err()
                .to_string()
                .contains("`mars`")
        );
        let e = err(&format!("{GOOD}imports: []\n"));
        assert!(e.contains("imports: list at least one pool"), "{e}");
        let e = err(&GOOD.replace(
            "    models: [m2]\n",
            "    models: [m2]\n    exported_from: [east]\n",
        ));
        assert!(
            e.contains("pools[1].endpoints") && e.contains("no endpoints served"),
            "{e}"
        );
    }
}
