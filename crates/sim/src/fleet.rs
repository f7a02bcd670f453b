//! A fleet of simulated servers in one process, spread over named clusters, and the admin HTTP
//! API that injects faults into it at run time.
//!
//! # Admin API (JSON; errors in the OpenAI error shape)
//! - `GET /servers`: every server's status (up, running, waiting, KV use, prefix counters, faults).
//! - `GET /clusters`: clusters with their network delay and servers.
//! - `POST /servers/{name}/stop`, `POST /servers/{name}/start`: crash and restart one server
//!   (connections refused while stopped; the restart keeps the port, loses queue and cache).
//! - `POST /clusters/{name}/stop`, `POST /clusters/{name}/start`: the same for a whole cluster.
//! - `POST /servers/{name}/faults`, `POST /clusters/{name}/faults`: body with any of
//!   `error_rate` (0..1, share of inference requests failed at once), `error_status` (500..599,
//!   default 503), `metrics_frozen` (bool: `/metrics` keeps serving the page of that moment),
//!   `metrics_delay_ms` (delay before `/metrics` answers), `kv_usage_override` (0..1: the KV
//!   use `/metrics` reports instead of the real one; null: the real one again), and for
//!   clusters `network_delay_ms`
//!   (added to every request to the cluster, a stand-in for a cross-region round trip).
//!
//! Every duration given here is simulated time: `--time-scale` shrinks it like the others.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::params::{MetricsFormat, SimConfig, SimConfigError};
use super::server::{ClusterState, ServerStatus, SimClock, SimServer};
use fleetpick_protocol::openai::ApiError;

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub servers: usize,
    pub clusters: Vec<String>,
    pub listen: IpAddr,
    /// One port per server, or empty for port 0 (the OS picks) everywhere.
    pub ports: Vec<u16>,
    pub seed: u64,
    pub time_scale: f64,
    pub config: SimConfig,
    /// Overrides every server's metric names.
    pub metrics_format: Option<MetricsFormat>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            servers: 4,
            clusters: vec!["local".to_string()],
            listen: IpAddr::from([127, 0, 0, 1]),
            ports: Vec::new(),
            seed: 0,
            time_scale: 1.0,
            config: SimConfig::default(),
            metrics_format: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] SimConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error("server {server} cannot listen on {addr}: {source}")]
    Bind {
        server: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile {
        path: String,
        source: std::io::Error,
    },
}

/// One line of the ready file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyEntry {
    pub name: String,
    pub cluster: String,
    /// `ip:port` of the server's OpenAI API and `/metrics`.
    pub address: String,
    /// `ip:port` of the fleet's admin API (the same for every entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    pub servers: Vec<Arc<SimServer>>,
    pub clusters: Vec<Arc<ClusterState>>,
    drivers: Vec<JoinHandle<()>>,
}

/// A fleetpick fleet file for the simulated servers `entries`: one cluster per simulator
/// cluster (with its region from `regions`, when listed, and the label `site: <cluster>` so
/// that a policy scope can select it), one pool `pool` serving `model`, and `extra` YAML
/// (picker, imports, scheduler, poller, server sections) appended. Tests, the demo and the
/// benchmarks put fleetpick in front of a simulated fleet with it.
pub fn fleet_file(
    entries: &[ReadyEntry],
    model: &str,
    regions: &[(&str, &str)],
    extra: &str,
) -> String {
    let mut clusters: Vec<&str> = Vec::new();
    for e in entries {
        if !clusters.contains(&e.cluster.as_str()) {
            clusters.push(&e.cluster);
        }
    }
    let mut y = String::from("clusters:\n");
    for c in &clusters {
        match regions.iter().find(|(name, _)| name == c) {
            Some((_, region)) => y.push_str(&format!(
                "  - {{name: {c}, region: {region}, labels: {{site: {c}}}}}\n"
            )),
            None => y.push_str(&format!("  - {{name: {c}, labels: {{site: {c}}}}}\n")),
        }
    }
    y.push_str(&format!(
        "pools:\n  - name: pool\n    models: [\"{model}\"]\n    target_port: 8000\n    endpoints:\n"
    ));
    for c in &clusters {
        let addrs: Vec<String> = entries
            .iter()
            .filter(|e| e.cluster == *c)
            .map(|e| format!("\"{}\"", e.address))
            .collect();
        y.push_str(&format!("      {c}: [{}]\n", addrs.join(", ")));
    }
    y.push_str(extra);
    y
}

/// Splits `n` servers over the clusters in contiguous groups, as evenly as possible; names
/// are `<cluster>-<index in cluster>`.
pub fn layout(n: usize, clusters: &[String]) -> Vec<(String, String)> {
    let k = clusters.len().max(1);
    let mut out = Vec::with_capacity(n);
    for (j, cluster) in clusters.iter().enumerate() {
        let count = n / k + usize::from(j < n % k);
        for i in 0..count {
            out.push((format!("{cluster}-{i}"), cluster.clone()));
        }
    }
    out
}

impl Fleet {
    /// Builds every server, binds them all, and starts their engines.
    pub async fn launch(opts: FleetOptions) -> Result<Fleet, SimError> {
        if opts.servers == 0 {
            return Err(SimError::Invalid("--servers must be at least 1".into()));
        }
        if !(opts.time_scale.is_finite() && opts.time_scale > 0.0) {
            return Err(SimError::Invalid(
                "--time-scale must be a positive number".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &opts.clusters {
            if c.is_empty() || !seen.insert(c) {
                return Err(SimError::Invalid(format!(
                    "--clusters: names must be non-empty and distinct (got {:?})",
                    opts.clusters
                )));
            }
        }
        if opts.clusters.len() > opts.servers {
            return Err(SimError::Invalid(format!(
                "--clusters names {} clusters but --servers is {}: every cluster needs a server",
                opts.clusters.len(),
                opts.servers
            )));
        }
        if !opts.ports.is_empty() && opts.ports.len() != opts.servers {
            return Err(SimError::Invalid(format!(
                "--ports lists {} ports for {} servers",
                opts.ports.len(),
                opts.servers
            )));
        }
        let names = layout(opts.servers, &opts.clusters);
        opts.config
            .check_names(&opts.clusters, names.iter().map(|(n, _)| n.as_str()))?;
        let clock = SimClock::new(opts.time_scale);
        let clusters: Vec<Arc<ClusterState>> = opts
            .clusters
            .iter()
            .map(|c| {
                let delay = opts
                    .config
                    .clusters
                    .get(c)
                    .map_or(0.0, |s| s.network_delay_ms);
                Arc::new(ClusterState::new(c.clone(), delay))
            })
            .collect();
        let mut servers = Vec::with_capacity(names.len());
        for (i, (name, cluster)) in names.into_iter().enumerate() {
            let mut params = opts.config.params_for(&name, &cluster)?;
            if let Some(f) = opts.metrics_format {
                params.metrics_format = f;
            }
            let cluster_state = clusters
                .iter()
                .find(|c| c.name == cluster)
                .cloned()
                .unwrap_or_default();
            let port = opts.ports.get(i).copied().unwrap_or(0);
            let seed = opts.seed ^ xxhash_rust::xxh3::xxh3_64(name.as_bytes());
            servers.push(SimServer::new(
                name,
                cluster_state,
                params,
                clock,
                SocketAddr::new(opts.listen, port),
                seed,
            ));
        }
        let mut fleet = Fleet {
            servers,
            clusters,
            drivers: Vec::new(),
        };
        for s in &fleet.servers {
            if let Err(source) = s.start().await {
                let err = SimError::Bind {
                    server: s.name.clone(),
                    addr: s.addr(),
                    source,
                };
                fleet.shutdown().await;
                return Err(err);
            }
            fleet.drivers.push(tokio::spawn(s.clone().drive()));
        }
        Ok(fleet)
    }

    pub fn entries(&self, admin: Option<SocketAddr>) -> Vec<ReadyEntry> {
        self.servers
            .iter()
            .map(|s| ReadyEntry {
                name: s.name.clone(),
                cluster: s.cluster.name.clone(),
                address: s.addr().to_string(),
                admin: admin.map(|a| a.to_string()),
            })
            .collect()
    }

    /// Writes the ready file atomically (a reader never sees half of it).
    pub fn write_ready_file(&self, path: &Path, admin: Option<SocketAddr>) -> Result<(), SimError> {
        let err = |source| SimError::ReadyFile {
            path: path.display().to_string(),
            source,
        };
        let json = serde_json::to_vec_pretty(&self.entries(admin)).map_err(|e| err(e.into()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn server(&self, name: &str) -> Option<&Arc<SimServer>> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// Stops every server and engine.
    pub async fn shutdown(&self) {
        for s in &self.servers {
            s.stop().await;
        }
        for d in &self.drivers {
            d.abort();
        }
    }

    /// Serves the admin API on `listener` until the task is dropped.
    pub async fn serve_admin(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let router = Router::new()
            .route("/servers", get(list_servers))
            .route("/clusters", get(list_clusters))
            .route("/servers/{name}/{action}", post(server_action))
            .route("/clusters/{name}/{action}", post(cluster_action))
            .fallback(|| async {
                admin_error(ApiError::new(404, "not_found_error", "no such admin route"))
            })
            .with_state(self);
        axum::serve(listener, router).await
    }
}

fn admin_error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.body(),
    )
        .into_response()
}

async fn list_servers(State(fleet): State<Arc<Fleet>>) -> axum::Json<Vec<ServerStatus>> {
    axum::Json(fleet.servers.iter().map(|s| s.status()).collect())
}

#[derive(Serialize)]
struct ClusterStatus {
    name: String,
    network_delay_ms: f64,
    servers: Vec<String>,
}

async fn list_clusters(State(fleet): State<Arc<Fleet>>) -> axum::Json<Vec<ClusterStatus>> {
    axum::Json(
        fleet
            .clusters
            .iter()
            .map(|c| ClusterStatus {
                name: c.name.clone(),
                network_delay_ms: c.delay_ms(),
                servers: fleet
                    .servers
                    .iter()
                    .filter(|s| s.cluster.name == c.name)
                    .map(|s| s.name.clone())
                    .collect(),
            })
            .collect(),
    )
}

/// The body of a `faults` call; absent fields leave the setting as it is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    error_rate: Option<f64>,
    error_status: Option<u16>,
    metrics_frozen: Option<bool>,
    metrics_delay_ms: Option<f64>,
    network_delay_ms: Option<f64>,
    /// `Some(None)` (JSON null) clears the override.
    #[serde(default, deserialize_with = "nullable")]
    kv_usage_override: Option<Option<f64>>,
}

/// Tells an absent field (`None`) from an explicit null (`Some(None)`).
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

impl FaultsBody {
    fn parse(body: &[u8], for_cluster: bool) -> Result<FaultsBody, ApiError> {
        let f: FaultsBody = if body.is_empty() {
            FaultsBody::default()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("faults body: {e}")))?
        };
        if let Some(r) = f.error_rate
            && !(0.0..=1.0).contains(&r)
        {
            return Err(ApiError::invalid("error_rate", "must be between 0 and 1"));
        }
        if let Some(s) = f.error_status
            && !(500..=599).contains(&s)
        {
            return Err(ApiError::invalid("error_status", "must be a 5xx status"));
        }
        for (field, v) in [
            ("metrics_delay_ms", f.metrics_delay_ms),
            ("network_delay_ms", f.network_delay_ms),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (0.0..=3_600_000.0).contains(&v))
            {
                return Err(ApiError::invalid(
                    field,
                    "must be a number of milliseconds, 0 to 3600000",
                ));
            }
        }
        if let Some(Some(kv)) = f.kv_usage_override
            && !(0.0..=1.0).contains(&kv)
        {
            return Err(ApiError::invalid(
                "kv_usage_override",
                "must be between 0 and 1, or null",
            ));
        }
        if f.network_delay_ms.is_some() && !for_cluster {
            return Err(ApiError::invalid(
                "network_delay_ms",
                "is set per cluster: use /clusters/{name}/faults",
            ));
        }
        Ok(f)
    }

    fn apply(&self, s: &SimServer) {
        if self.error_rate.is_some() || self.error_status.is_some() {
            let st = s.status();
            s.set_error_rate(
                self.error_rate.unwrap_or(st.error_rate),
                self.error_status.unwrap_or(503),
            );
        }
        if let Some(ms) = self.metrics_delay_ms {
            s.set_metrics_delay_ms(ms);
        }
        if let Some(kv) = self.kv_usage_override {
            s.set_kv_override(kv);
        }
        if let Some(frozen) = self.metrics_frozen {
            s.freeze_metrics(frozen);
        }
    }
}

async fn act(
    servers: &[&Arc<SimServer>],
    action: &str,
    body: &[u8],
    cluster: Option<&ClusterState>,
) -> Response {
    match action {
        "stop" => {
            for s in servers {
                s.stop().await;
            }
        }
        "start" => {
            for s in servers {
                if let Err(e) = s.start().await {
                    return admin_error(ApiError::new(
                        500,
                        "server_error",
                        format!("{} cannot listen on {} again: {e}", s.name, s.addr()),
                    ));
                }
            }
        }
        "faults" => {
            let f = match FaultsBody::parse(body, cluster.is_some()) {
                Ok(f) => f,
                Err(e) => return admin_error(e),
            };
            if let (Some(c), Some(ms)) = (cluster, f.network_delay_ms) {
                c.set_delay_ms(ms);
            }
            for s in servers {
                f.apply(s);
            }
        }
        other => {
            return admin_error(ApiError::new(
                404,
                "not_found_error",
                format!("unknown action `{other}` (stop, start, faults)"),
            ));
        }
    }
    axum::Json(servers.iter().map(|s| s.status()).collect::<Vec<_>>()).into_response()
}

async fn server_action(
    State(fleet): State<Arc<Fleet>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(server) = fleet.server(&name) else {
        return admin_error(ApiError::new(
            404,
            "not_found_error",
            format!("no server `{name}`"),
        ));
    };
    act(&[server], &action, &body, None).await
}

async fn cluster_action(
    State(fleet): State<Arc<Fleet>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(cluster) = fleet.clusters.iter().find(|c| c.name == name) else {
        return admin_error(ApiError::new(
            404,
            "not_found_error",
            format!("no cluster `{name}`"),
        ));
    };
    let servers: Vec<&Arc<SimServer>> = fleet
        .servers
        .iter()
        .filter(|s| s.cluster.name == name)
        .collect();
    act(&servers, &action, &body, Some(cluster)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config names clusters and servers of the fleet it documents; it lives here
    /// because server names come from [`layout`].
    #[test]
    fn example_config_is_valid() {
        let cfg = SimConfig::parse(
            include_str!("../../../examples/sim-fleet.yaml"),
            "examples/sim-fleet.yaml",
        )
        .unwrap();
        let clusters: Vec<String> = ["us-east", "us-west", "eu-west"].map(String::from).to_vec();
        let names = layout(6, &clusters);
        cfg.check_names(&clusters, names.iter().map(|(n, _)| n.as_str()))
            .unwrap();
        for (name, cluster) in &names {
            cfg.params_for(name, cluster).unwrap();
        }
        assert_eq!(
            cfg.params_for("us-east-0", "us-east").unwrap().num_blocks,
            4096
        );
        assert_eq!(
            cfg.params_for("us-west-1", "us-west").unwrap().max_num_seqs,
            32
        );
    }

    #[test]
    fn layout_spreads_evenly_in_groups() {
        let l = layout(5, &["a".into(), "b".into()]);
        let names: Vec<&str> = l.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["a-0", "a-1", "a-2", "b-0", "b-1"]);
    }

    #[test]
    fn faults_body_is_validated() {
        assert!(
            FaultsBody::parse(br#"{"error_rate":1.5}"#, false)
                .unwrap_err()
                .message
                .contains("error_rate")
        );
        assert!(
            FaultsBody::parse(br#"{"error_status":404}"#, false)
                .unwrap_err()
                .message
                .contains("error_status")
        );
        assert!(FaultsBody::parse(br#"{"network_delay_ms":5}"#, false).is_err());
        assert!(FaultsBody::parse(br#"{"network_delay_ms":5}"#, true).is_ok());
        assert!(
            FaultsBody::parse(br#"{"bogus":1}"#, true)
                .unwrap_err()
                .message
                .contains("bogus")
        );
    }
}
