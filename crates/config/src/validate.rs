//! Checks across fields of a parsed fleet file and its manifests, and the resolved
//! configuration they make: every error names its field, and its position where the file has it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::position::{Seg, locate, render_path};
use crate::{
    BackendPolicy, BodyMode, ConfigError, EndpointSpec, FleetConfig, FleetFile, Manifests,
    ObjectiveManifest, PoolPolicy, SessionAffinity, Weights, manifests,
};

/// Weights are relative; this bound keeps their weighted sums finite.
const MAX_WEIGHT: f64 = 1e6;

pub(crate) struct Checker<'a> {
    pub(crate) path: &'a str,
    pub(crate) text: &'a str,
}

impl Checker<'_> {
    fn err(&self, field: &[Seg], message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            position: locate(self.text, field),
            field: render_path(field),
            message: message.into(),
        }
    }
}

pub(crate) fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

pub(crate) fn validate(
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
                        m.target_ports,
                        m.name,
                        m.origin()
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
                    m.origin(),
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
            line: None,
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
                    o.origin(),
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
pub(crate) fn regions_of(file: &FleetFile) -> String {
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
        check_policy(&imp.policy, &at("policy"), c)?;
        out[p] = Some(resolve(&imp.policy));
    }
    Ok(out)
}

/// A policy's values and its scopes'.
fn check_policy(pol: &BackendPolicy, at: &[Seg], c: &Checker<'_>) -> Result<(), ConfigError> {
    let field = |path: &[Seg], f: &str| [path, &[key(f)]].concat();
    if let Some((name, message)) = pol.limits.out_of_range() {
        return Err(c.err(&field(at, name), message));
    }
    if !(pol.sheddable_capacity.is_finite()
        && pol.sheddable_capacity > 0.0
        && pol.sheddable_capacity <= 1.0)
    {
        return Err(c.err(
            &field(at, "sheddable_capacity"),
            "must be above 0 and at most 1 (a share of the capacity)",
        ));
    }
    for (s, scope) in pol.scopes.iter().enumerate() {
        let scope_at = [field(at, "scopes"), vec![Seg::Index(s)]].concat();
        if scope.match_labels.is_empty() {
            return Err(c.err(
                &field(&scope_at, "match_labels"),
                "name at least one label (a scope without labels would select every cluster)",
            ));
        }
        if let Some((name, message)) = scope.overrides.out_of_range() {
            return Err(c.err(&field(&scope_at, name), message));
        }
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
