//! Backend policies: what a policy and its scopes say about an imported pool's capacity, and
//! the policy as it applies in each cluster once scopes are resolved.
//!
//! The four capacity settings (`capacity_scaler`, `max_in_flight_per_endpoint`,
//! `kv_cache_threshold`, `queue_threshold`) are declared once, in [`Limits`]: with values for a
//! policy and for a policy resolved in a cluster, with optional values ([`LimitOverrides`]) for
//! a scope, which changes only what it names. Their defaults, range checks and resolution are
//! [`Limits`]' too.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

use crate::unique::UniqueKeys;

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

/// An endpoint's capacity under a policy. `F` and `U` hold the fractional and the counted
/// settings: plain values in a policy and in a cluster's resolved policy ([`Limits`]),
/// optional ones in a scope ([`LimitOverrides`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits<F = f64, U = u32> {
    /// Scales an endpoint's capacity (its thresholds, or its in-flight cap): 0 drains, so no
    /// new request goes there while those in flight finish.
    pub capacity_scaler: F,
    /// `in-flight` mode: the cap per endpoint.
    pub max_in_flight_per_endpoint: U,
    /// `kv-cache` mode: an endpoint at or above this KV-cache use is saturated.
    pub kv_cache_threshold: F,
    /// `kv-cache` mode: ... or with this many requests waiting.
    pub queue_threshold: U,
}

/// What a scope changes: the limits it names.
pub type LimitOverrides = Limits<Option<f64>, Option<u32>>;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity_scaler: 1.0,
            max_in_flight_per_endpoint: 64,
            // The reference saturation detector's thresholds: KV use 0.8, five waiting.
            kv_cache_threshold: 0.8,
            queue_threshold: 5,
        }
    }
}

impl Default for LimitOverrides {
    fn default() -> Self {
        Limits {
            capacity_scaler: None,
            max_in_flight_per_endpoint: None,
            kv_cache_threshold: None,
            queue_threshold: None,
        }
    }
}

impl Limits {
    /// These limits with what `scope` names in their place.
    pub fn overlaid(self, scope: &LimitOverrides) -> Limits {
        Limits {
            capacity_scaler: scope.capacity_scaler.unwrap_or(self.capacity_scaler),
            max_in_flight_per_endpoint: scope
                .max_in_flight_per_endpoint
                .unwrap_or(self.max_in_flight_per_endpoint),
            kv_cache_threshold: scope.kv_cache_threshold.unwrap_or(self.kv_cache_threshold),
            queue_threshold: scope.queue_threshold.unwrap_or(self.queue_threshold),
        }
    }
}

impl<F: Copy + Into<Option<f64>>, U: Copy + Into<Option<u32>>> Limits<F, U> {
    /// The first limit set out of range, as (its field, what it must be); a policy and its
    /// scopes are held to the same ranges.
    pub fn out_of_range(&self) -> Option<(&'static str, &'static str)> {
        if let Some(v) = self.capacity_scaler.into()
            && !(v.is_finite() && (0.0..=1000.0).contains(&v))
        {
            return Some(("capacity_scaler", "must be a number from 0 (drain) to 1000"));
        }
        if let Some(v) = self.kv_cache_threshold.into()
            && !(v.is_finite() && v > 0.0 && v <= 1.0)
        {
            return Some((
                "kv_cache_threshold",
                "must be above 0 and at most 1 (a share of the KV cache)",
            ));
        }
        if self.queue_threshold.into() == Some(0) {
            return Some(("queue_threshold", "must be at least 1"));
        }
        if self.max_in_flight_per_endpoint.into() == Some(0) {
            return Some((
                "max_in_flight_per_endpoint",
                "must be at least 1 (drain a cluster with capacity_scaler: 0)",
            ));
        }
        None
    }
}

impl LimitOverrides {
    /// Reads the limit `name` from `map` when `name` is one (false when it is not). A limit
    /// given twice is refused, as serde refuses any field given twice.
    fn read<'de, A: MapAccess<'de>>(
        &mut self,
        name: &'static str,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        fn put<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
            slot: &mut Option<T>,
            name: &'static str,
            map: &mut A,
        ) -> Result<bool, A::Error> {
            if slot.is_some() {
                return Err(de::Error::duplicate_field(name));
            }
            *slot = Some(map.next_value()?);
            Ok(true)
        }
        match name {
            "capacity_scaler" => put(&mut self.capacity_scaler, name, map),
            "max_in_flight_per_endpoint" => put(&mut self.max_in_flight_per_endpoint, name, map),
            "kv_cache_threshold" => put(&mut self.kv_cache_threshold, name, map),
            "queue_threshold" => put(&mut self.queue_threshold, name, map),
            _ => Ok(false),
        }
    }
}

/// A scope: clusters chosen by their labels (all must match), and what changes for them.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyScope {
    pub match_labels: BTreeMap<String, String>,
    pub overrides: LimitOverrides,
}

/// The backend policy of an imported pool.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendPolicy {
    pub balancing: BalancingMode,
    /// Thresholds, in-flight cap and capacity scaler (those not written: [`Limits::default`]).
    pub limits: Limits,
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
            limits: Limits::default(),
            sheddable_capacity: 1.0,
            dry_run: false,
            scopes: Vec::new(),
        }
    }
}

impl BackendPolicy {
    /// The policy in a cluster with these labels: the first scope that matches them applied.
    pub fn in_cluster(&self, labels: &BTreeMap<String, String>) -> ClusterPolicy {
        let scope = self.scopes.iter().find(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
        });
        ClusterPolicy {
            balancing: self.balancing,
            limits: scope.map_or(self.limits, |s| self.limits.overlaid(&s.overrides)),
            sheddable_capacity: self.sheddable_capacity,
        }
    }
}

/// A pool's policy as it applies in one cluster (scopes resolved).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterPolicy {
    pub balancing: BalancingMode,
    pub limits: Limits,
    pub sheddable_capacity: f64,
}

/// The default policy, as it applies in any cluster.
impl Default for ClusterPolicy {
    fn default() -> Self {
        BackendPolicy::default().in_cluster(&BTreeMap::new())
    }
}

/// An imported pool's policy, resolved per cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPolicy {
    pub per_cluster: Vec<ClusterPolicy>,
    pub dry_run: bool,
}

// The policy and its scopes are read field by field rather than derived with the limits as a
// `#[serde(flatten)]` field: flattened fields are buffered first, and serde's errors in them
// lose the field's name and position (`imports[0].policy: invalid type` at the policy's first
// line, rather than `imports[0].policy.capacity_scaler` where it is written).

/// A policy's fields, in the order serde's messages list them.
const POLICY_FIELDS: &[&str] = &[
    "balancing",
    "kv_cache_threshold",
    "queue_threshold",
    "max_in_flight_per_endpoint",
    "capacity_scaler",
    "sheddable_capacity",
    "dry_run",
    "scopes",
];

/// A scope's fields.
const SCOPE_FIELDS: &[&str] = &[
    "match_labels",
    "capacity_scaler",
    "max_in_flight_per_endpoint",
    "kv_cache_threshold",
    "queue_threshold",
];

/// Reads a key as one of `fields` (their `'static` name, which serde's errors take). An unknown
/// key is refused while it is read, so that serde's error has the key's position.
struct FieldName(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<&'static str, E> {
        self.0
            .iter()
            .copied()
            .find(|f| *f == key)
            .ok_or_else(|| E::unknown_field(key, self.0))
    }
}

impl<'de> Deserialize<'de> for BackendPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;

        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = BackendPolicy;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct BackendPolicy")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BackendPolicy, A::Error> {
                let mut p = BackendPolicy::default();
                let mut limits = LimitOverrides::default();
                let mut seen = Vec::new();
                while let Some(name) = map.next_key_seed(FieldName(POLICY_FIELDS))? {
                    if limits.read(name, &mut map)? {
                        continue;
                    }
                    if seen.contains(&name) {
                        return Err(de::Error::duplicate_field(name));
                    }
                    seen.push(name);
                    match name {
                        "balancing" => p.balancing = map.next_value()?,
                        "sheddable_capacity" => p.sheddable_capacity = map.next_value()?,
                        "dry_run" => p.dry_run = map.next_value()?,
                        "scopes" => p.scopes = map.next_value()?,
                        _ => return Err(de::Error::unknown_field(name, POLICY_FIELDS)),
                    }
                }
                p.limits = p.limits.overlaid(&limits);
                Ok(p)
            }
        }

        d.deserialize_struct("BackendPolicy", POLICY_FIELDS, PolicyVisitor)
    }
}

impl<'de> Deserialize<'de> for PolicyScope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScopeVisitor;

        impl<'de> Visitor<'de> for ScopeVisitor {
            type Value = PolicyScope;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct PolicyScope")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PolicyScope, A::Error> {
                let mut labels: Option<UniqueKeys<String>> = None;
                let mut overrides = LimitOverrides::default();
                while let Some(name) = map.next_key_seed(FieldName(SCOPE_FIELDS))? {
                    if overrides.read(name, &mut map)? {
                        continue;
                    }
                    if labels.is_some() {
                        return Err(de::Error::duplicate_field(name));
                    }
                    labels = Some(map.next_value()?);
                }
                let labels = labels.ok_or_else(|| de::Error::missing_field("match_labels"))?;
                Ok(PolicyScope {
                    match_labels: labels.0,
                    overrides,
                })
            }
        }

        d.deserialize_struct("PolicyScope", SCOPE_FIELDS, ScopeVisitor)
    }
}
