//! Backend policies: what a policy and its scopes say about an imported pool's capacity, and
//! the policy as it applies in each cluster once scopes are resolved.

use std::collections::BTreeMap;

use serde::Deserialize;

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
    #[serde(deserialize_with = "crate::schema::unique_keys")]
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
    pub(crate) fn resolve(
        policy: &BackendPolicy,
        labels: &BTreeMap<String, String>,
    ) -> ClusterPolicy {
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

/// An imported pool's policy, resolved per cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPolicy {
    pub per_cluster: Vec<ClusterPolicy>,
    pub dry_run: bool,
}
