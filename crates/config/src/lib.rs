//! The fleet file: what the picker serves and how it decides, validated once at load, with the
//! Kubernetes manifests it names.
//!
//! # Layout
//!
//! - `schema`: the fleet file as written, one type per section, with its serde defaults.
//! - `unique`: mappings that refuse a key given twice.
//! - `policy`: backend policies: the capacity limits, declared once ([`Limits`]; a scope's
//!   [`LimitOverrides`] are the same struct with optional values), read, checked and resolved
//!   per cluster ([`ClusterPolicy`]).
//! - `validate`: the checks across fields, which make the resolved configuration.
//! - `resolved`: that configuration, [`FleetConfig`] (endpoints served, policies per cluster,
//!   objectives).
//! - `error`: [`ConfigError`]: the file, the line and the field of every mistake.
//! - `position`: field paths (`pools[0].endpoints.us-west`) and where they are in the file
//!   (line and column, from saphyr's node tree; serde_norway reads the data).
//! - [`manifests`]: the InferencePools and InferenceObjectives of the manifests the file names.
//! - this file: loading ([`FleetConfig::load`], [`FleetConfig::parse`]) and the reference
//!   below.
//!
//! # The fleet file
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
//! Unknown fields are errors, and so is a key given twice in one mapping. Every error names the
//! field (`pools[0].endpoints.us-west`) and, where the file has it, its line, in block and flow
//! style alike (serde's errors: line and column; a checked value's: the line, and the column
//! in [`ConfigError::Invalid`]'s `position`). Errors in the manifests name their file,
//! document and line.

use std::path::Path;

use crate::validate::{Checker, regions_of, validate};

pub use fleetpick_protocol::{BodyMode, EngineKind};

mod error;
pub mod manifests;
mod policy;
mod position;
mod resolved;
mod schema;
mod unique;
mod validate;

pub use error::ConfigError;
pub use manifests::{Manifests, ObjectiveManifest, PoolManifest};
pub use policy::*;
pub use position::Position;
pub use resolved::{EndpointSpec, FleetConfig};
pub use schema::*;

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
            position: None,
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

    /// The field and position of an [`ConfigError::Invalid`] for `text` (read as `path`).
    fn invalid_at(text: &str, path: &str) -> (String, Option<(usize, usize)>) {
        match FleetConfig::parse(text, path) {
            Err(ConfigError::Invalid {
                field, position, ..
            }) => (field, position.map(|p| (p.line, p.column))),
            other => panic!("not an invalid field: {other:?}"),
        }
    }

    /// The line and column where `needle` first appears in `text`, as a person would count.
    fn written_at(text: &str, needle: &str) -> Option<(usize, usize)> {
        text.lines()
            .enumerate()
            .find_map(|(n, l)| l.find(needle).map(|c| (n + 1, l[..c].chars().count() + 1)))
    }

    #[test]
    fn errors_in_flow_style_name_the_fields_line_and_column() {
        // A map in a map.
        let text = format!("{GOOD}  weights: {{kv_cache: 1, queue: -1}}\n");
        assert_eq!(
            invalid_at(&text, "f"),
            ("scheduler.weights.queue".into(), Some((21, 26)))
        );
        // The same map over two lines: the field's line, not the map's.
        let text = format!("{GOOD}  weights: {{kv_cache: 1,\n    queue: -1}}\n");
        assert_eq!(
            invalid_at(&text, "f"),
            ("scheduler.weights.queue".into(), Some((22, 5)))
        );
        assert!(err(&text).starts_with("fleet.yaml:22: scheduler.weights.queue: must be"));
        // Maps in a list in a map in a list, on one line.
        let text = format!(
            "{GOOD}imports: [{{pool: llama, policy: {{scopes: [{{match_labels: {{a: b}}, capacity_scaler: 5000}}]}}}}]\n"
        );
        assert_eq!(
            invalid_at(&text, "f"),
            (
                "imports[0].policy.scopes[0].capacity_scaler".into(),
                written_at(&text, "capacity_scaler")
            )
        );
        // A list item, and a key of a flow map inside block style, over two lines.
        let text = GOOD.replace("west: [10.1.0.9]", "{west: [10.1.0.9,\n        10.1.0.9]}");
        let text = text.replace("    endpoints:\n      {west", "    endpoints: {west");
        assert_eq!(
            invalid_at(&text, "f"),
            (
                "pools[1].endpoints.west".into(),
                written_at(&text, "{west:").map(|(l, c)| (l, c + 1))
            )
        );
        let text = format!(
            "{GOOD}rewrites: [{{model: chat, targets: [{{model: m1}}, {{model: m2, weight: 2000000}}]}}]\n"
        );
        assert_eq!(
            invalid_at(&text, "f"),
            (
                "rewrites[0].targets[1].weight".into(),
                written_at(&text, "weight")
            )
        );
    }

    /// The documented example, `examples/fleet.yaml`, with its manifests.
    fn example() -> (String, String) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleet.yaml");
        (std::fs::read_to_string(path).unwrap(), path.to_string())
    }

    #[test]
    fn the_example_loads_and_its_errors_have_positions() {
        let (text, path) = example();
        let cfg = FleetConfig::load(Path::new(&path)).unwrap();
        assert_eq!(cfg.endpoints.len(), 6);
        for (from, to, field, needle) in [
            // Flow style: a scope's override, a pool's weights, an endpoint list.
            (
                "capacity_scaler: 0.5}",
                "capacity_scaler: 5000}",
                "imports[0].policy.scopes[0].capacity_scaler",
                "capacity_scaler: 5000",
            ),
            (
                "{prefix: 0, kv_cache: 2}",
                "{prefix: 0, kv_cache: -2}",
                "pools[1].weights.kv_cache",
                "kv_cache: -2",
            ),
            (
                "us-west: [\"10.1.1.10:8000\"",
                "us-west: [\"10.1.1.10:0\"",
                "pools[0].endpoints.us-west",
                "us-west: [\"10.1.1.10:0",
            ),
            (
                "{model: chat-lora, weight: 10}",
                "{model: chat-lora, weight: 10000000}",
                "rewrites[0].targets[1].weight",
                "weight: 10000000",
            ),
            // Block style.
            (
                "stale_after_ms: 500 ",
                "stale_after_ms: 10  ",
                "poller.stale_after_ms",
                "stale_after_ms: 10",
            ),
            (
                "      queue_threshold: 5 ",
                "      queue_threshold: 0 ",
                "imports[0].policy.queue_threshold",
                "queue_threshold: 0",
            ),
        ] {
            assert!(text.contains(from), "{from}");
            let bad = text.replacen(from, to, 1);
            assert_eq!(
                invalid_at(&bad, &path),
                (field.to_string(), written_at(&bad, needle)),
                "{from} -> {to}"
            );
        }
    }

    /// The reference at the top of this file is a fleet file that loads.
    #[test]
    fn the_reference_in_the_crate_docs_loads() {
        let yaml: String = include_str!("lib.rs")
            .lines()
            .skip_while(|l| *l != "//! ```yaml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
            .collect();
        assert!(yaml.contains("flow_control:"), "{yaml}");
        let cfg = FleetConfig::parse(&yaml, "reference").unwrap();
        assert_eq!(cfg.file.pools[0].lora_adapters, ["tool-lora"]);
    }

    #[test]
    fn keys_given_twice_are_refused() {
        // A field twice (serde's own check), block and flow.
        let e = err(&GOOD.replace("  fallbacks: 1\n", "  fallbacks: 1\n  fallbacks: 2\n"));
        assert!(
            e.contains("scheduler: duplicate field `fallbacks`") && e.contains("line 20"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}poller: {{interval_ms: 10, interval_ms: 20}}\n"
        ));
        assert!(
            e.contains("poller: duplicate field `interval_ms`") && e.contains("line 21"),
            "{e}"
        );
        // A map's key twice: the first list of endpoints would be lost without a word.
        let e = err(&GOOD.replace(
            "      west:\n        - 10.1.0.1\n",
            "      west:\n        - 10.1.0.1\n      east: [10.0.0.9]\n",
        ));
        assert!(
            e.contains("pools[0].endpoints: duplicate key `east`") && e.contains("line 10"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "  - name: west\n",
            "  - name: west\n    labels: {gpu: l4, gpu: a100}\n",
        ));
        assert!(
            e.contains("clusters[1].labels: duplicate key `gpu`") && e.contains("line 5"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}imports:\n  - pool: llama\n    policy:\n      scopes:\n        - {{match_labels: {{a: b, a: c}}, capacity_scaler: 0}}\n"
        ));
        assert!(e.contains("match_labels: duplicate key `a`"), "{e}");
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
        assert_eq!(p.per_cluster[0].limits.capacity_scaler, 1.0);
        assert_eq!(p.per_cluster[1].limits.capacity_scaler, 0.5);
        assert_eq!(p.per_cluster[1].limits.max_in_flight_per_endpoint, 8);
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
    fn serde_errors_in_policies_and_scopes_name_the_field_and_its_line() {
        let with = |policy: &str| format!("{GOOD}imports:\n  - pool: llama\n    policy:\n{policy}");
        // A policy's and a scope's misspelt field: their own line, and what they may be.
        let e = err(&with("      dry_run: true\n      capacity_scalar: 0.5\n"));
        assert!(
            e.contains(
                "imports[0].policy: unknown field `capacity_scalar`, expected one of `balancing`"
            ) && e.contains("line 25 column 7"),
            "{e}"
        );
        let e = err(&with(
            "      scopes:\n        - match_labels: {a: b}\n          capacity_scalar: 0\n",
        ));
        assert!(
            e.contains("imports[0].policy.scopes[0]: unknown field `capacity_scalar`, expected one of `match_labels`, `capacity_scaler`")
                && e.contains("line 26 column 11"),
            "{e}"
        );
        // Wrong types: the field, where its value is.
        let e = err(&with("      kv_cache_threshold: high\n"));
        assert!(
            e.contains("imports[0].policy.kv_cache_threshold: invalid type: string \"high\", expected f64 at line 24 column 27"),
            "{e}"
        );
        let e = err(&with(
            "      scopes:\n        - {match_labels: {a: b}, queue_threshold: 2.5}\n",
        ));
        assert!(
            e.contains("imports[0].policy.scopes[0].queue_threshold: invalid type: floating point `2.5`, expected u32 at line 25 column 51"),
            "{e}"
        );
        // Given twice, and missing.
        let e = err(&with(
            "      queue_threshold: 1\n      queue_threshold: 2\n",
        ));
        assert!(
            e.contains("imports[0].policy: duplicate field `queue_threshold`"),
            "{e}"
        );
        let e = err(&with(
            "      scopes: [{capacity_scaler: 0, capacity_scaler: 1}]\n",
        ));
        assert!(
            e.contains("scopes[0]: duplicate field `capacity_scaler`"),
            "{e}"
        );
        let e = err(&with("      scopes: [{capacity_scaler: 0}]\n"));
        assert!(e.contains("scopes[0]: missing field `match_labels`"), "{e}");
        // A scope overrides what it names and nothing else.
        let cfg = FleetConfig::parse(
            &format!(
                "{}      queue_threshold: 9\n      scopes: [{{match_labels: {{gpu: l4}}, capacity_scaler: 0.5}}]\n",
                with("").replace("  - name: west\n", "  - name: west\n    labels: {gpu: l4}\n")
            ),
            "f",
        )
        .unwrap();
        let p = cfg.policies[0].as_ref().unwrap();
        assert_eq!(
            p.per_cluster[1].limits,
            Limits {
                capacity_scaler: 0.5,
                queue_threshold: 9,
                ..Limits::default()
            }
        );
        assert_eq!(p.per_cluster[0].limits.capacity_scaler, 1.0);
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
        assert!(e.contains("k8s/pools.yaml:6, objective 1)"), "{e}");
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
