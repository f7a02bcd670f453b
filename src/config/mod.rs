//! The fleet file: what the picker serves and how it decides, validated once at load.
//!
//! ```yaml
//! server:                     # the ext_proc listener and request handling
//!   listen: 127.0.0.1:9002
//!   body_mode: full-duplex    # full-duplex | buffered: what Envoy's filter is configured with
//!   max_body_bytes: 8388608   # larger request bodies get 413
//! clusters:
//!   - name: us-east
//!     region: us-east1
//!     labels: {tier: a100}
//! pools:
//!   - name: llama
//!     models: [meta-llama/Llama-3.1-8B-Instruct, sql-lora]
//!     engine: vllm            # vllm | sglang | trtllm | triton: which metric names to read
//!     target_port: 8000
//!     endpoints:
//!       us-east: [10.0.0.1, "10.0.0.2:8001"]   # ip (target_port) or ip:port
//! scheduler:
//!   weights: {kv_cache: 1, queue: 2, in_flight: 2, prefill: 3}
//!   fallbacks: 0              # extra endpoints after the primary in the destination list
//! poller:
//!   interval_ms: 50
//!   timeout_ms: 1000
//!   stale_after_ms: 500
//!   backoff_max_ms: 1000
//! ```
//!
//! Unknown fields are errors. Every error names the field (`pools[0].endpoints.us-west`) and,
//! where it can be found, the line in the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use crate::collect::profile::EngineKind;

pub use crate::envoy::BodyMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub body_mode: BodyMode,
    pub max_body_bytes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9002)),
            body_mode: BodyMode::FullDuplex,
            // Far above any chat prompt, below Envoy's own buffer limits in BUFFERED mode.
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_region() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub name: String,
    /// Model names (base models and LoRA adapters) this pool serves.
    pub models: Vec<String>,
    #[serde(default)]
    pub engine: EngineKind,
    pub target_port: u16,
    /// Path of the Prometheus page on each endpoint.
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    /// Endpoints per cluster name: `ip` (at `target_port`) or `ip:port`.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
}

fn default_metrics_path() -> String {
    "/metrics".to_string()
}

/// Scorer weights. A weight of 0 switches a scorer off.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
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
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            kv_cache: 1.0,
            queue: 2.0,
            in_flight: 2.0,
            prefill: 3.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    pub weights: Weights,
    /// Endpoints listed after the primary, for Envoy's retries to walk down. Only for an Envoy
    /// that reads a list (`envoy-fallback.yaml`, override_host): an ORIGINAL_DST cluster
    /// (`envoy.yaml`) takes exactly one `ip:port` and answers 503 to a list.
    pub fallbacks: usize,
}

#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    #[serde(default)]
    pub server: ServerSettings,
    pub clusters: Vec<ClusterSpec>,
    pub pools: Vec<PoolSpec>,
    #[serde(default)]
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub poller: PollerSettings,
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

/// A validated fleet file.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub file: FleetFile,
    pub endpoints: Vec<EndpointSpec>,
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

    /// Parses and validates fleet-file text; `path` is only used in messages.
    pub fn parse(text: &str, path: &str) -> Result<FleetConfig, ConfigError> {
        let file: FleetFile =
            serde_norway::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_string(),
                source,
            })?;
        let c = Checker { path, text };
        validate(&file, &c)
    }
}

fn validate(file: &FleetFile, c: &Checker<'_>) -> Result<FleetConfig, ConfigError> {
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
    if file.pools.is_empty() {
        return Err(c.err(&[key("pools")], "at least one pool is needed"));
    }
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
        for m in &pool.models {
            if m.is_empty() {
                return Err(c.err(&at("models"), "model names must not be empty"));
            }
            if let Some(other) = model_pool.insert(m.as_str(), pool.name.as_str()) {
                return Err(c.err(
                    &at("models"),
                    format!("model `{m}` is served by pool `{other}` already: a model belongs to one pool"),
                ));
            }
        }
        if pool.target_port == 0 {
            return Err(c.err(&at("target_port"), "must be a port number, 1 to 65535"));
        }
        if !pool.metrics_path.starts_with('/') {
            return Err(c.err(&at("metrics_path"), "must start with `/`"));
        }
        for (cluster, addrs) in &pool.endpoints {
            let field = [key("pools"), Seg::Index(p), key("endpoints"), key(cluster)];
            let Some(&ci) = cluster_index.get(cluster.as_str()) else {
                let known: Vec<&str> = file.clusters.iter().map(|c| c.name.as_str()).collect();
                return Err(c.err(
                    &field,
                    format!(
                        "no cluster named `{cluster}` (clusters: {})",
                        known.join(", ")
                    ),
                ));
            };
            for a in addrs {
                let addr = parse_endpoint(a, pool.target_port).ok_or_else(|| {
                    c.err(&field, format!("`{a}` is not an IP address or ip:port"))
                })?;
                let owner = format!("pool `{}`, cluster `{cluster}`", pool.name);
                if let Some(prev) = seen_addrs.insert(addr, owner) {
                    return Err(c.err(
                        &field,
                        format!("endpoint {addr} is listed twice (also in {prev})"),
                    ));
                }
                endpoints.push(EndpointSpec {
                    addr,
                    cluster: ci,
                    pool: p,
                });
            }
        }
    }
    let w = &file.scheduler.weights;
    for (name, v) in [
        ("kv_cache", w.kv_cache),
        ("queue", w.queue),
        ("in_flight", w.in_flight),
        ("prefill", w.prefill),
    ] {
        if !(v.is_finite() && (0.0..=MAX_WEIGHT).contains(&v)) {
            return Err(c.err(
                &[key("scheduler"), key("weights"), key(name)],
                format!("must be a number from 0 to {MAX_WEIGHT}"),
            ));
        }
    }
    if w.kv_cache + w.queue + w.in_flight + w.prefill <= 0.0 {
        return Err(c.err(
            &[key("scheduler"), key("weights")],
            "at least one weight must be above 0",
        ));
    }
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
    if file.server.max_body_bytes == 0 {
        return Err(c.err(
            &[key("server"), key("max_body_bytes")],
            "must be at least 1",
        ));
    }
    Ok(FleetConfig {
        file: file.clone(),
        endpoints,
    })
}

/// `ip` or `ip:port` (IPv6 as `[ip]:port`).
fn parse_endpoint(s: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return (a.port() != 0).then_some(a);
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, default_port))
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
            "{GOOD}  weights: {{kv_cache: 0, queue: 0, in_flight: 0, prefill: 0}}\n"
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
}
