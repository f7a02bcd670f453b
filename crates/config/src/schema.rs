//! The fleet file as written: one type per section, with its serde defaults. Backend policies
//! are in [`crate::policy`]; what is checked across fields, in [`crate::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::BackendPolicy;
use fleetpick_protocol::{BodyMode, EngineKind};

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
    #[serde(default, deserialize_with = "crate::unique::unique_keys")]
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
    #[serde(default, deserialize_with = "crate::unique::unique_keys")]
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
