//! Checks across fields of a parsed fleet file and its manifests, and the resolved
//! configuration they make: every error names its field, and its position where the file has it.
//!
//! [`validate`] runs one check per section of the file. The order is kept as it was when they
//! were one function, so that a file with several mistakes is told the same one first.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use fleetpick_protocol::BodyMode;

use crate::error::ConfigError;
use crate::manifests::{self, Manifests, ObjectiveManifest, PoolManifest};
use crate::policy::{BackendPolicy, PoolPolicy};
use crate::position::{FieldPath, locate};
use crate::resolved::{EndpointSpec, FleetConfig};
use crate::schema::{
    FleetFile, PollerSettings, PoolSpec, ServerSettings, SessionAffinity, Weights,
};

/// Weights are relative; this bound keeps their weighted sums finite.
const MAX_WEIGHT: f64 = 1e6;

/// Makes the errors of one file: its name, and its text for positions.
pub(crate) struct Checker<'a> {
    pub(crate) path: &'a str,
    pub(crate) text: &'a str,
}

impl Checker<'_> {
    fn err(&self, field: &FieldPath, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            position: locate(self.text, field),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// What the pools serve, as checked.
struct Served<'f> {
    /// The endpoints of imported pools, in clusters that export them.
    endpoints: Vec<EndpointSpec>,
    /// The pool serving each model and adapter name.
    models: HashMap<&'f str, &'f str>,
}

/// Checks `file` with its `manifests` and resolves what it serves.
pub(crate) fn validate(
    file: &FleetFile,
    manifests: &Manifests,
    c: &Checker<'_>,
) -> Result<FleetConfig, ConfigError> {
    let clusters = check_clusters(file, c)?;
    if file.pools.is_empty() {
        return Err(c.err(&FieldPath::top("pools"), "at least one pool is needed"));
    }
    let policies = check_imports(file, c)?;
    let served = check_pools(file, manifests, &clusters, &policies, c)?;
    let objectives = check_objectives(file, manifests, c)?;
    check_flow_control(file, c)?;
    check_manifest_objectives(file, manifests, c)?;
    check_picker_region(file, c)?;
    check_imports_are_served(file, &policies, &served.endpoints, c)?;
    check_weights(
        &file.scheduler.weights,
        &FieldPath::top("scheduler").key("weights"),
        c,
    )?;
    check_rewrites(file, &served.models, &policies, c)?;
    check_poller(&file.poller, c)?;
    check_server(&file.server, c)?;
    if file.scheduler.cluster_recovery_ms > 600_000 {
        return Err(c.err(
            &FieldPath::top("scheduler").key("cluster_recovery_ms"),
            "must be at most 600000 (ten minutes)",
        ));
    }
    Ok(FleetConfig {
        file: file.clone(),
        endpoints: served.endpoints,
        policies,
        objectives,
    })
}

/// The clusters' names (each once) and round trips; their indices by name.
fn check_clusters<'f>(
    file: &'f FleetFile,
    c: &Checker<'_>,
) -> Result<HashMap<&'f str, usize>, ConfigError> {
    let at = FieldPath::top("clusters");
    if file.clusters.is_empty() {
        return Err(c.err(&at, "at least one cluster is needed"));
    }
    let mut index = HashMap::new();
    for (i, cl) in file.clusters.iter().enumerate() {
        let name = at.index(i).key("name");
        if cl.name.is_empty() {
            return Err(c.err(&name, "must not be empty"));
        }
        if index.insert(cl.name.as_str(), i).is_some() {
            return Err(c.err(&name, format!("cluster `{}` is defined twice", cl.name)));
        }
    }
    for (i, cl) in file.clusters.iter().enumerate() {
        if let Some(rtt) = cl.rtt_ms
            && !(rtt.is_finite() && (0.0..=60_000.0).contains(&rtt))
        {
            return Err(c.err(
                &at.index(i).key("rtt_ms"),
                "must be a number of milliseconds from 0 to 60000",
            ));
        }
    }
    Ok(index)
}

/// Checks `imports` and resolves each imported pool's policy per cluster.
fn check_imports(
    file: &FleetFile,
    c: &Checker<'_>,
) -> Result<Vec<Option<PoolPolicy>>, ConfigError> {
    let resolve = |policy: &BackendPolicy| PoolPolicy {
        per_cluster: file
            .clusters
            .iter()
            .map(|cl| policy.in_cluster(&cl.labels))
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
            &FieldPath::top("imports"),
            "list at least one pool, or leave imports out to serve every pool",
        ));
    }
    let mut out = vec![None; file.pools.len()];
    for (i, imp) in imports.iter().enumerate() {
        let at = FieldPath::top("imports").index(i);
        let Some(p) = file.pools.iter().position(|p| p.name == imp.pool) else {
            let known: Vec<&str> = file.pools.iter().map(|p| p.name.as_str()).collect();
            return Err(c.err(
                &at.key("pool"),
                format!("no pool named `{}` (pools: {})", imp.pool, known.join(", ")),
            ));
        };
        if out[p].is_some() {
            return Err(c.err(
                &at.key("pool"),
                format!("pool `{}` is imported twice", imp.pool),
            ));
        }
        check_policy(&imp.policy, &at.key("policy"), c)?;
        out[p] = Some(resolve(&imp.policy));
    }
    Ok(out)
}

/// A policy's values and its scopes'.
fn check_policy(pol: &BackendPolicy, at: &FieldPath, c: &Checker<'_>) -> Result<(), ConfigError> {
    if let Some((name, message)) = pol.limits.out_of_range() {
        return Err(c.err(&at.key(name), message));
    }
    if !(pol.sheddable_capacity.is_finite()
        && pol.sheddable_capacity > 0.0
        && pol.sheddable_capacity <= 1.0)
    {
        return Err(c.err(
            &at.key("sheddable_capacity"),
            "must be above 0 and at most 1 (a share of the capacity)",
        ));
    }
    for (s, scope) in pol.scopes.iter().enumerate() {
        let scope_at = at.key("scopes").index(s);
        if scope.match_labels.is_empty() {
            return Err(c.err(
                &scope_at.key("match_labels"),
                "name at least one label (a scope without labels would select every cluster)",
            ));
        }
        if let Some((name, message)) = scope.overrides.out_of_range() {
            return Err(c.err(&scope_at.key(name), message));
        }
    }
    Ok(())
}

/// Every pool, and the endpoints and models it serves.
fn check_pools<'f>(
    file: &'f FleetFile,
    manifests: &Manifests,
    clusters: &HashMap<&str, usize>,
    policies: &[Option<PoolPolicy>],
    c: &Checker<'_>,
) -> Result<Served<'f>, ConfigError> {
    let mut names = HashSet::new();
    let mut served = Served {
        endpoints: Vec::new(),
        models: HashMap::new(),
    };
    // Each endpoint's pool and cluster, for the message when it is listed again.
    let mut owners = HashMap::new();
    for (p, pool) in file.pools.iter().enumerate() {
        let at = FieldPath::top("pools").index(p);
        if pool.name.is_empty() {
            return Err(c.err(&at.key("name"), "must not be empty"));
        }
        if !names.insert(pool.name.as_str()) {
            return Err(c.err(
                &at.key("name"),
                format!("pool `{}` is defined twice", pool.name),
            ));
        }
        check_pool_models(pool, &at, &mut served.models, c)?;
        if let Some(w) = &pool.weights {
            check_weights(w, &at.key("weights"), c)?;
        }
        if let Some(sa) = &pool.session_affinity {
            check_session_affinity(sa, &at.key("session_affinity"), c)?;
        }
        let manifest = manifests.pools.iter().find(|m| m.name == pool.name);
        let ports = target_ports(pool, manifest, &at, c)?;
        check_export(pool, manifest, &at, c)?;
        if !pool.metrics_path.starts_with('/') {
            return Err(c.err(&at.key("metrics_path"), "must start with `/`"));
        }
        check_pool_clusters(file, pool, clusters, &at, c)?;
        let imported = policies[p].is_some();
        let endpoints = pool_endpoints(file, p, &ports, imported, &mut owners, c)?;
        served.endpoints.extend(endpoints);
    }
    Ok(served)
}

/// A pool's models and adapters: named, and each served by this pool alone.
fn check_pool_models<'f>(
    pool: &'f PoolSpec,
    at: &FieldPath,
    served: &mut HashMap<&'f str, &'f str>,
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    if pool.models.is_empty() {
        return Err(c.err(&at.key("models"), "list at least one model"));
    }
    let names = pool.models.iter().map(|m| ("models", m));
    let adapters = pool.lora_adapters.iter().map(|m| ("lora_adapters", m));
    for (field, m) in names.chain(adapters) {
        if m.is_empty() {
            return Err(c.err(&at.key(field), "model names must not be empty"));
        }
        if let Some(other) = served.insert(m.as_str(), pool.name.as_str()) {
            return Err(c.err(
                &at.key(field),
                format!(
                    "model `{m}` is served by pool `{other}` already: a model belongs to one pool"
                ),
            ));
        }
    }
    Ok(())
}

/// The ports of a pool's endpoints listed by IP alone: its `target_port`, else the
/// `targetPorts` of its InferencePool (which the `target_port`, if set, must be among).
fn target_ports(
    pool: &PoolSpec,
    manifest: Option<&PoolManifest>,
    at: &FieldPath,
    c: &Checker<'_>,
) -> Result<Vec<u16>, ConfigError> {
    match (pool.target_port, manifest) {
        (Some(0), _) => Err(c.err(
            &at.key("target_port"),
            "must be a port number, 1 to 65535",
        )),
        (Some(p), Some(m)) if !m.target_ports.contains(&p) => Err(c.err(
            &at.key("target_port"),
            format!(
                "{p} is not among the targetPorts {:?} of InferencePool `{}` in {}",
                m.target_ports,
                m.name,
                m.origin()
            ),
        )),
        (Some(p), _) => Ok(vec![p]),
        (None, Some(m)) => Ok(m.target_ports.clone()),
        (None, None) => Err(c.err(
            &at.key("name"),
            format!(
                "pool `{}` needs a target_port, or an InferencePool of that name among the manifests",
                pool.name
            ),
        )),
    }
}

/// A pool whose InferencePool is not exported serves in one cluster only.
fn check_export(
    pool: &PoolSpec,
    manifest: Option<&PoolManifest>,
    at: &FieldPath,
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    if let Some(m) = manifest
        && !m.exported
        && pool.exported_from.is_none()
        && pool.endpoints.len() > 1
    {
        return Err(c.err(
            &at.key("endpoints"),
            format!(
                "InferencePool `{}` ({}) is not exported (annotation {}: ClusterSet), so it serves in one cluster only: list its endpoints under one cluster, set exported_from, or export it",
                m.name,
                m.origin(),
                manifests::EXPORT_ANNOTATION
            ),
        ));
    }
    Ok(())
}

/// The clusters a pool names (in `exported_from` and `endpoints`) exist.
fn check_pool_clusters(
    file: &FleetFile,
    pool: &PoolSpec,
    clusters: &HashMap<&str, usize>,
    at: &FieldPath,
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    let known = || {
        file.clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for name in pool.exported_from.iter().flatten() {
        if !clusters.contains_key(name.as_str()) {
            return Err(c.err(
                &at.key("exported_from"),
                format!("no cluster named `{name}` (clusters: {})", known()),
            ));
        }
    }
    for cluster in pool.endpoints.keys() {
        if !clusters.contains_key(cluster.as_str()) {
            return Err(c.err(
                &at.key("endpoints").key(cluster),
                format!("no cluster named `{cluster}` (clusters: {})", known()),
            ));
        }
    }
    Ok(())
}

/// Pool `p`'s endpoints, in the order the clusters are declared: each an address, listed once
/// in the whole file; those served (`imported`, in a cluster that exports the pool) returned.
fn pool_endpoints(
    file: &FleetFile,
    p: usize,
    ports: &[u16],
    imported: bool,
    owners: &mut HashMap<SocketAddr, String>,
    c: &Checker<'_>,
) -> Result<Vec<EndpointSpec>, ConfigError> {
    let pool = &file.pools[p];
    let mut served = Vec::new();
    for (ci, cluster) in file.clusters.iter().enumerate() {
        let Some(addrs) = pool.endpoints.get(&cluster.name) else {
            continue;
        };
        let field = FieldPath::top("pools")
            .index(p)
            .key("endpoints")
            .key(&cluster.name);
        let exports = pool
            .exported_from
            .as_ref()
            .is_none_or(|e| e.contains(&cluster.name));
        for a in addrs {
            let addrs = parse_endpoint(a, ports)
                .ok_or_else(|| c.err(&field, format!("`{a}` is not an IP address or ip:port")))?;
            for addr in addrs {
                let owner = format!("pool `{}`, cluster `{}`", pool.name, cluster.name);
                if let Some(prev) = owners.insert(addr, owner) {
                    return Err(c.err(
                        &field,
                        format!("endpoint {addr} is listed twice (also in {prev})"),
                    ));
                }
                if imported && exports {
                    served.push(EndpointSpec {
                        addr,
                        cluster: ci,
                        pool: p,
                    });
                }
            }
        }
    }
    Ok(served)
}

/// The fleet file's objectives (named once, beside the manifests' too, for a pool that serves
/// their models), after the manifests'.
fn check_objectives(
    file: &FleetFile,
    manifests: &Manifests,
    c: &Checker<'_>,
) -> Result<Vec<ObjectiveManifest>, ConfigError> {
    let mut objectives = manifests.objectives.clone();
    for (i, o) in file.objectives.iter().enumerate() {
        let at = FieldPath::top("objectives").index(i);
        if o.name.is_empty() {
            return Err(c.err(&at.key("name"), "must not be empty"));
        }
        if objectives.iter().any(|m| m.name == o.name) {
            return Err(c.err(
                &at.key("name"),
                format!("objective `{}` is defined twice", o.name),
            ));
        }
        let Some(pool) = file.pools.iter().find(|p| p.name == o.pool) else {
            return Err(c.err(&at.key("pool"), format!("no pool named `{}`", o.pool)));
        };
        for m in &o.models {
            if !pool.models.contains(m) && !pool.lora_adapters.contains(m) {
                return Err(c.err(
                    &at.key("models"),
                    format!("pool `{}` does not serve `{m}`", o.pool),
                ));
            }
            if let Some(other) = file.objectives[..i].iter().find(|x| x.models.contains(m)) {
                return Err(c.err(
                    &at.key("models"),
                    format!("`{m}` takes objective `{}` already", other.name),
                ));
            }
        }
        objectives.push(ObjectiveManifest {
            name: o.name.clone(),
            priority: o.priority,
            pool: o.pool.clone(),
            source: "the fleet file".into(),
            line: None,
        });
    }
    Ok(objectives)
}

/// Flow control's bounds, and its time to live against Envoy's in buffered mode.
fn check_flow_control(file: &FleetFile, c: &Checker<'_>) -> Result<(), ConfigError> {
    let fc = &file.flow_control;
    let at = FieldPath::top("flow_control");
    if fc.max_requests_per_band == 0 {
        return Err(c.err(&at.key("max_requests_per_band"), "must be at least 1"));
    }
    if fc.max_bytes_per_band < file.server.max_body_bytes {
        return Err(c.err(
            &at.key("max_bytes_per_band"),
            format!(
                "must be at least server.max_body_bytes ({}), or a large request could never wait",
                file.server.max_body_bytes
            ),
        ));
    }
    if !(1..=3_600_000).contains(&fc.ttl_ms) {
        return Err(c.err(&at.key("ttl_ms"), "must be from 1 to 3600000 (an hour)"));
    }
    let limit = fleetpick_protocol::envoy::MESSAGE_TIMEOUT_MS;
    if fc.enabled && file.server.body_mode == BodyMode::Buffered && fc.ttl_ms >= limit {
        return Err(c.err(
            &at.key("ttl_ms"),
            format!(
                "must be below {limit} with server.body_mode buffered: Envoy gives up on an answer after {limit} ms (message_timeout) in that mode"
            ),
        ));
    }
    Ok(())
}

/// The manifests' InferenceObjectives are for pools of this file.
fn check_manifest_objectives(
    file: &FleetFile,
    manifests: &Manifests,
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    for (i, o) in manifests.objectives.iter().enumerate() {
        if !file.pools.iter().any(|p| p.name == o.pool) {
            return Err(c.err(
                &FieldPath::top("manifests"),
                format!(
                    "InferenceObjective `{}` ({}, objective {}) refers to pool `{}`, which the fleet file does not define",
                    o.name,
                    o.origin(),
                    i + 1,
                    o.pool
                ),
            ));
        }
    }
    Ok(())
}

/// The picker's region is some cluster's.
fn check_picker_region(file: &FleetFile, c: &Checker<'_>) -> Result<(), ConfigError> {
    if let Some(region) = &file.picker.region
        && !file.clusters.iter().any(|cl| &cl.region == region)
    {
        return Err(c.err(
            &FieldPath::top("picker").key("region"),
            format!(
                "`{region}` is not the region of any cluster ({}): every cluster would be remote",
                regions_of(file)
            ),
        ));
    }
    Ok(())
}

/// Every imported pool serves some endpoint.
fn check_imports_are_served(
    file: &FleetFile,
    policies: &[Option<PoolPolicy>],
    endpoints: &[EndpointSpec],
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    for (p, pool) in file.pools.iter().enumerate() {
        if policies[p].is_some() && !endpoints.iter().any(|e| e.pool == p) {
            return Err(c.err(
                &FieldPath::top("pools").index(p).key("endpoints"),
                format!(
                    "pool `{}` is imported but has no endpoints served (check endpoints and exported_from)",
                    pool.name
                ),
            ));
        }
    }
    Ok(())
}

/// The poller's periods, and data that outlives a poll.
fn check_poller(p: &PollerSettings, c: &Checker<'_>) -> Result<(), ConfigError> {
    let at = FieldPath::top("poller");
    for (name, v) in [
        ("interval_ms", p.interval_ms),
        ("timeout_ms", p.timeout_ms),
        ("stale_after_ms", p.stale_after_ms),
        ("backoff_max_ms", p.backoff_max_ms),
    ] {
        if v == 0 {
            return Err(c.err(&at.key(name), "must be at least 1"));
        }
    }
    if p.stale_after_ms < p.interval_ms {
        return Err(c.err(
            &at.key("stale_after_ms"),
            format!(
                "must be at least interval_ms ({}), or every endpoint goes stale between polls",
                p.interval_ms
            ),
        ));
    }
    Ok(())
}

/// The server's shutdown grace and body limit.
fn check_server(server: &ServerSettings, c: &Checker<'_>) -> Result<(), ConfigError> {
    let at = FieldPath::top("server");
    if server.shutdown_grace_ms > 600_000 {
        return Err(c.err(
            &at.key("shutdown_grace_ms"),
            "must be at most 600000 (ten minutes)",
        ));
    }
    if server.max_body_bytes == 0 {
        return Err(c.err(&at.key("max_body_bytes"), "must be at least 1"));
    }
    Ok(())
}

fn check_weights(w: &Weights, at: &FieldPath, c: &Checker<'_>) -> Result<(), ConfigError> {
    for (name, v) in w.named() {
        if !(v.is_finite() && (0.0..=MAX_WEIGHT).contains(&v)) {
            return Err(c.err(
                &at.key(name),
                format!("must be a number from 0 to {MAX_WEIGHT}"),
            ));
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
    at: &FieldPath,
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    match (&sa.header, &sa.cookie) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(c.err(at, "set exactly one of `header` and `cookie`"));
        }
        (Some(h), None) if !is_token(h) || h.starts_with(':') => {
            return Err(c.err(
                &at.key("header"),
                format!("`{h}` is not an HTTP header name"),
            ));
        }
        (None, Some(k)) if !is_token(k) => {
            return Err(c.err(&at.key("cookie"), format!("`{k}` is not a cookie name")));
        }
        _ => {}
    }
    if !(1..=10_000_000).contains(&sa.max_sessions) {
        return Err(c.err(&at.key("max_sessions"), "must be from 1 to 10000000"));
    }
    Ok(())
}

/// Rewrites: each client-facing name once, to served models of imported pools.
fn check_rewrites(
    file: &FleetFile,
    served: &HashMap<&str, &str>,
    policies: &[Option<PoolPolicy>],
    c: &Checker<'_>,
) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, r) in file.rewrites.iter().enumerate() {
        let at = FieldPath::top("rewrites").index(i);
        if r.model.is_empty() {
            return Err(c.err(&at.key("model"), "must not be empty"));
        }
        if !seen.insert(r.model.as_str()) {
            return Err(c.err(
                &at.key("model"),
                format!("`{}` is rewritten twice", r.model),
            ));
        }
        if r.targets.is_empty() {
            return Err(c.err(&at.key("targets"), "list at least one target"));
        }
        for (j, t) in r.targets.iter().enumerate() {
            let target = at.key("targets").index(j);
            let Some(pool) = served.get(t.model.as_str()) else {
                return Err(c.err(
                    &target.key("model"),
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
                    &target.key("model"),
                    format!(
                        "`{}` is served by pool `{pool}`, which is not imported",
                        t.model
                    ),
                ));
            }
            if t.weight > 1_000_000 {
                return Err(c.err(&target.key("weight"), "must be at most 1000000"));
            }
        }
        if r.targets.iter().all(|t| t.weight == 0) {
            return Err(c.err(&at.key("targets"), "at least one weight must be above 0"));
        }
    }
    Ok(())
}

/// The distinct regions of the clusters, for messages.
pub(crate) fn regions_of(file: &FleetFile) -> String {
    let set: BTreeSet<&str> = file.clusters.iter().map(|c| c.region.as_str()).collect();
    set.into_iter().collect::<Vec<_>>().join(", ")
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
