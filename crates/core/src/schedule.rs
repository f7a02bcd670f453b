//! Scheduling: which endpoint serves a request. Plain functions over the fleet's current view;
//! no I/O and nothing awaited. The only locks a pick takes are the prefix index's: a shard read
//! lock of its concurrent map per block looked up, held for that lookup only.
//!
//! Two tiers. First the cluster tier decides where a request may go:
//! - filters: the pool serving the model, the proxy's subset hint, fresh metrics, a cluster
//!   that is up (see [`ClusterHealth`](crate::fleet::ClusterHealth)), and the pool's backend
//!   policy in the endpoint's cluster: a `capacity_scaler` of 0 drains (no new requests), and
//!   in `in-flight` mode an endpoint at its cap is full;
//! - locality: endpoints in the picker's region with headroom under the policy (below the KV
//!   and queue thresholds, or below the in-flight cap) are preferred; when none has any, the
//!   request spills to every endpoint with headroom, near or far; when none anywhere has any,
//!   `kv-cache` mode (a soft limit) serves from all of them and `in-flight` mode (a hard one)
//!   refuses.
//!
//! Then the endpoint tier scores the allowed endpoints, each scorer giving 0..1 where 1 is best:
//! - `kv_cache`: `1 - kv_usage` (free KV cache, as reported);
//! - `queue`: the waiting count, scaled between the candidates' minimum (1) and maximum (0);
//! - `in_flight`: this picker's own requests in flight there, scaled the same way. It moves the
//!   instant a request is picked, so a burst between two polls spreads instead of piling onto
//!   the endpoint that looked idlest at the last scrape;
//! - `prefill`: of those, the ones still waiting for their first token, scaled the same way. A
//!   request sent where others are in prefill shares their prefill steps and waits longer for
//!   its own first token; this is what round robin avoids by accident and a load score alone
//!   does not see (two requests a few milliseconds apart look alike to a 50 ms scrape);
//! - `rtt`: `1 - rtt / 100 ms`, the cluster's configured or measured round trip in steps of
//!   5 ms, on an absolute scale so that it separates regions, not hosts in one;
//! - `prefix`: the leading prompt blocks the endpoint holds by the picker's prefix index, half
//!   as a share of the prompt and half as an absolute length (full at 1,024 tokens), so a long
//!   shared system prompt counts in a long prompt too. A load guard gives no credit to an
//!   endpoint queued well past the least queued one: a hot prefix gets a second holder instead
//!   of a hot spot.
//!
//! The highest weighted sum wins; endpoints within a hair of it tie and one is drawn at random,
//! so idle endpoints share the next requests instead of the first in list order taking them all.
//! Fallbacks are the next best, and the last of them is in another cluster when any other
//! cluster can serve, so that Envoy's retries survive the loss of a whole cluster.
//!
//! A pool whose policy is a dry run is scheduled under the default policy; the configured one is
//! evaluated beside it and its verdict on the pick is returned for reporting.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::fleet::{Cluster, Endpoint, Fleet, Load};
use crate::profile::LoraInfo;
use fleetpick_config::{BalancingMode, ClusterPolicy, Weights};

/// What the scheduler needs to know about a request.
#[derive(Debug, Default)]
pub struct PickRequest<'a> {
    /// The requested model; `None` for requests that name none (they may go to any pool).
    pub model: Option<&'a str>,
    /// The proxy's subset hint: only these endpoints may serve.
    pub subset: Option<&'a [SocketAddr]>,
    /// Gather an [`Explain`] (for the debug log); off on the hot path.
    pub explain: bool,
    /// The prompt's block hashes (see [`crate::prefix`]), for the `prefix` scorer.
    pub prefix: &'a [u64],
    /// The endpoint the request's session was last sent to (session affinity): it is picked
    /// again while it is in the tier and passes the load guard.
    pub session: Option<usize>,
    /// A sheddable request: it sees only the policy's `sheddable_capacity` share of each
    /// endpoint's capacity, so it finds the pool saturated sooner.
    pub sheddable: bool,
}

/// Where the primary came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The picker's region, with headroom.
    Local,
    /// Another region: the local one had no headroom.
    Spill,
    /// Past the policy's thresholds everywhere (`kv-cache` mode serves anyway).
    Saturated,
    /// Only clusters that are down or recovering had fresh endpoints.
    LastResort,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Spill => "spill",
            Tier::Saturated => "saturated",
            Tier::LastResort => "last-resort",
        }
    }
}

/// What a dry-run policy would have done with the pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same endpoint was allowed and preferred.
    Allow,
    /// Its cluster is drained (`capacity_scaler: 0`).
    Drained,
    /// It is at its in-flight cap.
    AtCapacity,
    /// Allowed, but the policy would have preferred others (local ones with headroom, or ones
    /// with headroom anywhere).
    NotPreferred,
    /// The policy would have refused the request (every endpoint at its cap).
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Drained => "drained",
            Verdict::AtCapacity => "at-capacity",
            Verdict::NotPreferred => "not-preferred",
            Verdict::Reject => "reject",
        }
    }
}

/// The chosen endpoints, as indices into [`Fleet::endpoints`].
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub primary: usize,
    pub fallbacks: Vec<usize>,
    pub tier: Tier,
    /// The verdict of the primary's pool policy when it is a dry run.
    pub dry_run: Option<Verdict>,
    /// The primary's in-flight cap under the policy this pick was made with (`u32::MAX` when
    /// the policy sets none): the caller takes the count only below it.
    pub cap: u32,
    pub explain: Option<Explain>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("the model `{0}` is not served here")]
    UnknownModel(String),
    #[error("no eligible endpoint: {0}")]
    NoEndpoint(&'static str),
    #[error("every eligible endpoint is at its max_in_flight_per_endpoint")]
    AtCapacity,
}

/// Why each cluster's endpoints were or were not candidates, and the top scores: one
/// structured line per request at debug level.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explain {
    pub clusters: Vec<ClusterTally>,
    /// The best candidates, best first: (endpoint, cluster, score).
    pub top: Vec<(String, String, f64)>,
}

/// Per cluster: its endpoints in the pool, and what became of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterTally {
    pub cluster: String,
    pub health: &'static str,
    pub endpoints: u32,
    pub outside_subset: u32,
    pub stale: u32,
    pub cluster_out: u32,
    pub drained: u32,
    pub at_capacity: u32,
    pub saturated: u32,
    /// Allowed, but not in the tier the request was served from.
    pub other_tier: u32,
    pub in_tier: u32,
}

impl ClusterTally {
    fn of(c: &Cluster) -> ClusterTally {
        ClusterTally {
            cluster: c.name.clone(),
            health: c.health().as_str(),
            ..ClusterTally::default()
        }
    }
}

impl fmt::Display for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.clusters.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} ({}): {}/{} in tier",
                c.cluster, c.health, c.in_tier, c.endpoints
            )?;
            for (n, why) in [
                (c.outside_subset, "outside subset"),
                (c.stale, "stale"),
                (c.cluster_out, "cluster out"),
                (c.drained, "drained"),
                (c.at_capacity, "at capacity"),
                (c.saturated, "saturated"),
                (c.other_tier, "other tier"),
            ] {
                if n > 0 {
                    write!(f, ", {n} {why}")?;
                }
            }
        }
        f.write_str(" | top:")?;
        for (addr, cluster, score) in &self.top {
            write!(f, " {addr}@{cluster}={score:.3}")?;
        }
        Ok(())
    }
}

/// An endpoint under a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Drained,
    AtCapacity,
    Saturated,
    Headroom,
}

impl Class {
    fn allowed(self) -> bool {
        matches!(self, Class::Saturated | Class::Headroom)
    }
}

/// A cluster policy made ready for classifying many endpoints: its limits scaled once. (Not
/// the config's `Limits`, which this is made from.)
#[derive(Debug, Clone, Copy)]
struct Capacity {
    drained: bool,
    /// `in-flight` mode's cap.
    cap: Option<u32>,
    /// `kv-cache` mode: saturated at this KV use or this queue (the thresholds times the
    /// capacity scaler). Compared as they are: a reciprocal would put 93 x (1/93) below 1.
    kv_limit: f64,
    queue_limit: f64,
}

impl Capacity {
    fn new(p: &ClusterPolicy) -> Capacity {
        let scaler = p.limits.capacity_scaler;
        Capacity {
            drained: scaler <= 0.0,
            cap: (p.balancing == BalancingMode::InFlight).then(|| in_flight_cap(p)),
            kv_limit: p.limits.kv_cache_threshold * scaler,
            queue_limit: f64::from(p.limits.queue_threshold) * scaler,
        }
    }

    /// An endpoint's class. In `kv-cache` mode its queue is the larger of the scraped waiting
    /// count and this picker's requests there still waiting for their first token: a burst
    /// between two scrapes counts at once, not one poll later.
    fn classify(&self, load: &Load, in_flight: u32, awaiting: u32) -> Class {
        if self.drained {
            return Class::Drained;
        }
        match self.cap {
            Some(cap) if in_flight >= cap => Class::AtCapacity,
            Some(_) => Class::Headroom,
            None => {
                let queue = f64::from(load.waiting.max(awaiting));
                // `|`, not `||`: both comparisons, no branch between them (mixed loads would
                // mispredict it).
                if (load.kv_usage >= self.kv_limit) | (queue >= self.queue_limit) {
                    Class::Saturated
                } else {
                    Class::Headroom
                }
            }
        }
    }
}

impl Capacity {
    /// How many more requests the endpoint takes before it has no headroom: the room under
    /// the in-flight cap, or under the queue threshold (at least 1 while it has headroom).
    fn free(&self, load: &Load, in_flight: u32, awaiting: u32) -> u32 {
        match self.classify(load, in_flight, awaiting) {
            Class::Drained | Class::AtCapacity | Class::Saturated => 0,
            Class::Headroom => match self.cap {
                Some(cap) => cap.saturating_sub(in_flight),
                None => {
                    let room = self.queue_limit.ceil() - f64::from(load.waiting.max(awaiting));
                    room.clamp(1.0, f64::from(u32::MAX)) as u32
                }
            },
        }
    }
}

/// The saturation detector: how many more requests `pool` takes now before no endpoint has
/// headroom under the pool's policy (0: saturated). Only endpoints with fresh metrics in
/// clusters that serve count: stale data counts as saturated. Flow control releases queued
/// requests while this is above 0.
pub fn free_slots(fleet: &Fleet, pool: usize) -> u32 {
    free_slots_per_cluster(fleet, pool)
        .into_iter()
        .fold(0, u32::saturating_add)
}

/// [`free_slots`] per cluster (by cluster index): the detector per (pool, cluster).
pub fn free_slots_per_cluster(fleet: &Fleet, pool: usize) -> Vec<u32> {
    let now = fleet.clock.now_ms();
    let stale_after = fleet.poller.stale_after_ms;
    // One policy per cluster for this pool, worked out once.
    let capacity: Vec<Capacity> = (0..fleet.clusters.len())
        .map(|c| Capacity::new(&fleet.policies.enforced(pool, c)))
        .collect();
    let mut free = vec![0u32; fleet.clusters.len()];
    for &index in &fleet.pools[pool].endpoints {
        let ep = &fleet.endpoints[index];
        if !fleet.clusters[ep.cluster].health().serves() {
            continue;
        }
        let Some(load) = ep.load.fresh(now, stale_after) else {
            continue;
        };
        free[ep.cluster] = free[ep.cluster].saturating_add(capacity[ep.cluster].free(
            &load,
            ep.in_flight.load(Ordering::Relaxed),
            ep.awaiting_first_token.load(Ordering::Relaxed),
        ));
    }
    free
}

/// What every endpoint of one (pool, cluster) shares in a pick, worked out once.
#[derive(Debug, Clone, Copy)]
struct ClusterView {
    capacity: Capacity,
    dry: Option<Capacity>,
    /// The `rtt` scorer's value for the cluster.
    rtt_score: f64,
}

impl ClusterView {
    /// The view of `ep`'s pool and cluster, for a request that is `sheddable` or not.
    fn of(fleet: &Fleet, ep: &Endpoint, sheddable: bool) -> ClusterView {
        let policies = &fleet.policies;
        let mut enforced = policies.enforced(ep.pool, ep.cluster);
        if sheddable {
            enforced.limits.capacity_scaler *= enforced.sheddable_capacity;
        }
        ClusterView {
            capacity: Capacity::new(&enforced),
            dry: policies
                .dry_run(ep.pool, ep.cluster)
                .map(|p| Capacity::new(&p)),
            rtt_score: 1.0
                - (fleet.cluster_rtt_ms(ep.cluster) * (1.0 / RTT_SCALE_MS)).clamp(0.0, 1.0),
        }
    }
}

/// The in-flight cap of an endpoint under `p`: the configured one scaled, at least 1 while the
/// scaler is above 0.
pub fn in_flight_cap(p: &ClusterPolicy) -> u32 {
    let cap = (f64::from(p.limits.max_in_flight_per_endpoint) * p.limits.capacity_scaler).floor();
    if cap >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        (cap as u32).max(1)
    }
}

/// One candidate's inputs, gathered in one pass.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    index: usize,
    cluster: usize,
    local: bool,
    kv: f64,
    waiting: u32,
    in_flight: u32,
    awaiting: u32,
    rtt_score: f64,
    class: Class,
    /// Under the dry-run policy, when the endpoint's pool has one.
    dry: Option<Class>,
    in_tier: bool,
    /// Leading prompt blocks this endpoint holds, by the prefix index.
    matched: u32,
    score: f64,
}

impl Candidate {
    /// `ep` with its fresh `load`, classified under its cluster's `view`.
    fn of(ep: &Endpoint, local: bool, load: &Load, view: &ClusterView) -> Candidate {
        let in_flight = ep.in_flight.load(Ordering::Relaxed);
        let awaiting = ep.awaiting_first_token.load(Ordering::Relaxed);
        Candidate {
            index: ep.index,
            cluster: ep.cluster,
            local,
            kv: load.kv_usage,
            waiting: load.waiting,
            in_flight,
            awaiting,
            rtt_score: view.rtt_score,
            class: view.capacity.classify(load, in_flight, awaiting),
            dry: view.dry.map(|d| d.classify(load, in_flight, awaiting)),
            in_tier: false,
            matched: 0,
            score: 0.0,
        }
    }
}

/// Scores differing by less than this are a tie.
const TIE: f64 = 1e-9;

/// The round trip at which the `rtt` scorer gives 0.
const RTT_SCALE_MS: f64 = 100.0;

/// The tier a set of allowed candidates is served from, given each one's class and locality.
fn tier_of<'a>(mut it: impl Iterator<Item = (bool, Class)> + Clone + 'a) -> Option<Tier> {
    if it.clone().any(|(local, c)| local && c == Class::Headroom) {
        Some(Tier::Local)
    } else if it.clone().any(|(_, c)| c == Class::Headroom) {
        Some(Tier::Spill)
    } else if it.any(|(_, c)| c.allowed()) {
        Some(Tier::Saturated)
    } else {
        None
    }
}

fn in_tier(tier: Tier, local: bool, class: Class) -> bool {
    match tier {
        Tier::Local => local && class == Class::Headroom,
        Tier::Spill => class == Class::Headroom,
        Tier::Saturated | Tier::LastResort => class.allowed(),
    }
}

/// Picks the endpoint for `req`, with up to `fallbacks` more in order of preference.
pub fn pick(
    fleet: &Fleet,
    req: &PickRequest<'_>,
    weights: &Weights,
    fallbacks: usize,
    rng: &mut fastrand::Rng,
) -> Result<Pick, PickError> {
    let (members, weights) = members_of(fleet, req.model, weights)?;
    let mut found = gather(fleet, req, members);
    let tier = found.tier()?;
    let cands = &mut found.cands;
    for c in cands.iter_mut() {
        c.in_tier = in_tier(tier, c.local, c.class);
    }
    score_candidates(fleet, req, weights, cands);
    let winner = draw_winner(cands, rng);
    let dry_run = winner
        .dry
        .map(|class| dry_run_verdict(&winner, class, cands));
    // The winner's cap, as its cluster's view worked it out for the classes above.
    let cap = found
        .view(&fleet.endpoints[winner.index])
        .and_then(|v| v.capacity.cap)
        .unwrap_or(u32::MAX);
    let mut fallback_list = Vec::new();
    if fallbacks > 0 && !found.cands.is_empty() {
        fallback_list = order_fallbacks(fleet, &mut found.cands, &winner, fallbacks, rng);
    }
    let explain = req
        .explain
        .then(|| explain(fleet, found.tally, &found.cands, &winner));
    Ok(Pick {
        primary: winner.index,
        fallbacks: fallback_list,
        tier,
        dry_run,
        cap,
        explain,
    })
}

/// The endpoints a request for `model` may go to (its pool's; every endpoint for a request
/// naming none), and the weights to score them with (the pool's own, else `weights`).
fn members_of<'f>(
    fleet: &'f Fleet,
    model: Option<&str>,
    weights: &'f Weights,
) -> Result<(Box<dyn Iterator<Item = usize> + 'f>, &'f Weights), PickError> {
    match model {
        Some(model) => {
            let p = fleet
                .pool_for(model)
                .ok_or_else(|| PickError::UnknownModel(model.to_string()))?;
            Ok((
                Box::new(fleet.pools[p].endpoints.iter().copied()),
                fleet.weights_for(Some(p), weights),
            ))
        }
        None => Ok((Box::new(0..fleet.endpoints.len()), weights)),
    }
}

/// The cluster tier's pass over a request's endpoints.
struct Gathered {
    /// Fresh endpoints in the subset, in clusters that serve, classified under their policy.
    cands: Vec<Candidate>,
    /// Fresh endpoints of clusters that are down or recovering: served only when nothing else
    /// is.
    held_back: Vec<Candidate>,
    /// Some endpoint was in the proxy's subset hint (or there was none).
    in_subset: bool,
    /// Some candidate is not allowed under its policy.
    excluded: bool,
    /// Per cluster, for [`Explain`] (empty when not explaining).
    tally: Vec<ClusterTally>,
    /// Per (pool, cluster), worked out on first use.
    views: Vec<Option<ClusterView>>,
    n_clusters: usize,
}

impl Gathered {
    fn count(&mut self, cluster: usize, f: fn(&mut ClusterTally) -> &mut u32) {
        if let Some(t) = self.tally.get_mut(cluster) {
            *f(t) += 1;
        }
    }

    /// The view of an endpoint's (pool, cluster), if the pass worked it out.
    fn view(&self, ep: &Endpoint) -> Option<&ClusterView> {
        self.views[ep.pool * self.n_clusters + ep.cluster].as_ref()
    }

    /// The tier the request is served from, the candidates narrowed to those allowed: when no
    /// serving cluster has any, recovering or down clusters' fresh endpoints (better than an
    /// error); when none of those either, why nothing could serve.
    fn tier(&mut self) -> Result<Tier, PickError> {
        let tier = match tier_of(self.cands.iter().map(|c| (c.local, c.class))) {
            Some(t) => t,
            None => {
                self.held_back.retain(|c| c.class.allowed());
                if self.held_back.is_empty() {
                    return Err(self.why_none());
                }
                self.cands = std::mem::take(&mut self.held_back);
                Tier::LastResort
            }
        };
        // (The last resort's candidates are allowed ones already.)
        if self.excluded {
            self.cands.retain(|c| c.class.allowed());
        }
        Ok(tier)
    }

    fn why_none(&self) -> PickError {
        if !self.in_subset {
            PickError::NoEndpoint("none of the pool's endpoints is in the proxy's subset hint")
        } else if self.cands.iter().any(|c| c.class == Class::AtCapacity) {
            PickError::AtCapacity
        } else if self.cands.iter().any(|c| c.class == Class::Drained) {
            PickError::NoEndpoint("every fresh endpoint is drained (capacity_scaler 0)")
        } else {
            PickError::NoEndpoint("every endpoint is down or its metrics are stale")
        }
    }
}

/// The cluster tier: each of `members` filtered (subset, freshness, cluster health) and
/// classified under its pool's policy in its cluster.
fn gather(fleet: &Fleet, req: &PickRequest<'_>, members: impl Iterator<Item = usize>) -> Gathered {
    let now = fleet.clock.now_ms();
    let stale_after = fleet.poller.stale_after_ms;
    let n_clusters = fleet.clusters.len();
    let mut g = Gathered {
        cands: Vec::with_capacity(fleet.endpoints.len().min(1024)),
        held_back: Vec::new(),
        in_subset: false,
        excluded: false,
        tally: if req.explain {
            fleet.clusters.iter().map(ClusterTally::of).collect()
        } else {
            Vec::new()
        },
        views: vec![None; fleet.pools.len() * n_clusters],
        n_clusters,
    };
    for index in members {
        let ep = &fleet.endpoints[index];
        g.count(ep.cluster, |t| &mut t.endpoints);
        if let Some(subset) = req.subset
            && !subset.contains(&ep.addr)
        {
            g.count(ep.cluster, |t| &mut t.outside_subset);
            continue;
        }
        g.in_subset = true;
        let Some(load) = ep.load.fresh(now, stale_after) else {
            g.count(ep.cluster, |t| &mut t.stale);
            continue;
        };
        let view = *g.views[ep.pool * n_clusters + ep.cluster]
            .get_or_insert_with(|| ClusterView::of(fleet, ep, req.sheddable));
        let c = Candidate::of(ep, fleet.clusters[ep.cluster].local, &load, &view);
        if !fleet.clusters[ep.cluster].health().serves() {
            g.count(ep.cluster, |t| &mut t.cluster_out);
            g.held_back.push(c);
            continue;
        }
        // Branches on the class only when explaining: with mixed loads they mispredict, and this
        // loop runs for every endpoint of the pool.
        if req.explain {
            match c.class {
                Class::Drained => g.count(ep.cluster, |t| &mut t.drained),
                Class::AtCapacity => g.count(ep.cluster, |t| &mut t.at_capacity),
                Class::Saturated => g.count(ep.cluster, |t| &mut t.saturated),
                Class::Headroom => {}
            }
        }
        g.excluded |= !c.class.allowed();
        g.cands.push(c);
    }
    g
}

/// The endpoint tier: each candidate's score, with its prefix matches looked up first.
fn score_candidates(
    fleet: &Fleet,
    req: &PickRequest<'_>,
    weights: &Weights,
    cands: &mut [Candidate],
) {
    if !req.prefix.is_empty() && weights.prefix > 0.0 {
        let indices: Vec<usize> = cands.iter().map(|c| c.index).collect();
        for (c, m) in cands
            .iter_mut()
            .zip(fleet.prefix.matched(req.prefix, &indices))
        {
            c.matched = m;
        }
    }
    // The `lora` scorer reads the endpoint's adapters only for requests naming one; the
    // candidate record stays as small as the scoring passes need.
    let adapter = req
        .model
        .filter(|m| weights.lora > 0.0 && fleet.is_adapter(m));
    let lora_of = |index: usize| {
        adapter.map_or(0.0, |a| {
            lora_score(fleet.endpoints[index].lora.load().as_deref(), a)
        })
    };
    score(cands, weights, req.prefix.len(), req.session, lora_of);
}

/// Takes the winner out of `cands`: drawn among those in the tier that tie for the best score,
/// so that idle endpoints share the next requests.
fn draw_winner(cands: &mut Vec<Candidate>, rng: &mut fastrand::Rng) -> Candidate {
    // Selects rather than filters, so that these passes do not branch on each candidate.
    let in_tier_score = |c: &Candidate| {
        if c.in_tier {
            c.score
        } else {
            f64::NEG_INFINITY
        }
    };
    let best = cands
        .iter()
        .map(in_tier_score)
        .fold(f64::NEG_INFINITY, f64::max);
    let is_best = |c: &Candidate| in_tier_score(c) >= best - TIE;
    let tied: usize = cands.iter().map(|c| usize::from(is_best(c))).sum();
    let nth = rng.usize(..tied.max(1));
    let winner_pos = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| is_best(c))
        .nth(nth)
        .map(|(i, _)| i)
        .unwrap_or(0);
    cands.swap_remove(winner_pos)
}

/// What the dry-run policy (under which the winner's class is `class`) would have done with
/// the pick, given the other candidates (`rest`).
fn dry_run_verdict(winner: &Candidate, class: Class, rest: &[Candidate]) -> Verdict {
    let dry_tier = tier_of(
        rest.iter()
            .chain(std::iter::once(winner))
            .filter_map(|c| c.dry.map(|d| (c.local, d))),
    );
    match (dry_tier, class) {
        (None, _) => Verdict::Reject,
        (_, Class::Drained) => Verdict::Drained,
        (_, Class::AtCapacity) => Verdict::AtCapacity,
        (Some(t), class) if in_tier(t, winner.local, class) => Verdict::Allow,
        _ => Verdict::NotPreferred,
    }
}

/// Up to `n` fallbacks from `rest` (reordered): the request's own tier first, best score first,
/// ties at random; the last in another cluster than the winner's when any other can serve, so
/// that retries survive a whole cluster's loss.
fn order_fallbacks(
    fleet: &Fleet,
    rest: &mut [Candidate],
    winner: &Candidate,
    n: usize,
    rng: &mut fastrand::Rng,
) -> Vec<usize> {
    // Shuffle before the stable sort so that ties among fallbacks are random too.
    rng.shuffle(rest);
    rest.sort_by(|a, b| b.in_tier.cmp(&a.in_tier).then(b.score.total_cmp(&a.score)));
    let mut list: Vec<usize> = rest.iter().take(n).map(|c| c.index).collect();
    let crosses = |i: &usize| fleet.endpoints[*i].cluster != winner.cluster;
    if !list.iter().any(crosses)
        && let Some(other) = rest.iter().find(|c| c.cluster != winner.cluster)
    {
        if list.len() == n {
            list.pop();
        }
        list.push(other.index);
    }
    list
}

/// The debug line's content: per cluster, what became of its endpoints, and the top scores
/// (the winner, then the best two of the rest).
fn explain(
    fleet: &Fleet,
    mut tally: Vec<ClusterTally>,
    rest: &[Candidate],
    winner: &Candidate,
) -> Explain {
    for c in rest.iter().chain(std::iter::once(winner)) {
        if let Some(t) = tally.get_mut(c.cluster) {
            if c.in_tier {
                t.in_tier += 1;
            } else {
                t.other_tier += 1;
            }
        }
    }
    let mut ranked: Vec<&Candidate> = rest.iter().collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    let name = |c: &Candidate| {
        (
            fleet.endpoints[c.index].addr_text.clone(),
            fleet.clusters[c.cluster].name.clone(),
            c.score,
        )
    };
    let mut top = vec![name(winner)];
    top.extend(ranked.iter().take(2).map(|c| name(c)));
    Explain {
        clusters: tally,
        top,
    }
}

/// The `lora` scorer: the adapter running there (no load, no wait) beats a free slot (a load,
/// tens of milliseconds), which beats waiting for a slot behind other adapters' requests.
fn lora_score(info: Option<&LoraInfo>, adapter: &str) -> f64 {
    let Some(info) = info else {
        // Not reported (an engine without the metric): between a free slot and a wait.
        return 0.45;
    };
    if info.running.iter().any(|a| a == adapter) {
        1.0
    } else if info.max_lora == 0 || info.running.len() < info.max_lora as usize {
        0.6
    } else if info.waiting.iter().any(|a| a == adapter) {
        0.3
    } else {
        0.0
    }
}

/// A session's endpoint, while it passes the load guard, scores above any weighted sum (which
/// is at most 1).
const SESSION_SCORE: f64 = 2.0;

/// Matched prefix blocks at which the absolute half of the prefix score is full: 1,024 tokens.
const PREFIX_FULL_BLOCKS: f64 = 64.0;

/// How many more requests than the least loaded candidate an endpoint may have queued (scraped
/// waiting, or this picker's requests awaiting a first token) and still get prefix credit: past
/// it, the prefix is worth less than the wait, and the request goes elsewhere, making a second
/// holder of the prefix.
const PREFIX_GUARD_QUEUE: u32 = 3;

/// Scores every candidate. `session`: the endpoint the request's session is bound to;
/// `lora_of`: the `lora` scorer's value of an endpoint.
fn score(
    cands: &mut [Candidate],
    w: &Weights,
    prompt_blocks: usize,
    session: Option<usize>,
    lora_of: impl Fn(usize) -> f64,
) {
    let queue = Scale::of(cands.iter().map(|c| c.waiting));
    let flight = Scale::of(cands.iter().map(|c| c.in_flight));
    let prefill = Scale::of(cands.iter().map(|c| c.awaiting));
    let least_queued = cands
        .iter()
        .map(|c| c.waiting.max(c.awaiting))
        .min()
        .unwrap_or(0);
    let inv_total = 1.0 / w.total().max(f64::MIN_POSITIVE);
    let inv_blocks = if prompt_blocks == 0 {
        0.0
    } else {
        1.0 / prompt_blocks as f64
    };
    for c in cands.iter_mut() {
        let guarded = c.class == Class::Saturated
            || c.waiting.max(c.awaiting) > least_queued + PREFIX_GUARD_QUEUE;
        let prefix = if prompt_blocks == 0 || guarded {
            0.0
        } else {
            let m = f64::from(c.matched);
            0.5 * m * inv_blocks + 0.5 * (m * (1.0 / PREFIX_FULL_BLOCKS)).min(1.0)
        };
        let kv = 1.0 - c.kv.clamp(0.0, 1.0);
        let score = (w.kv_cache * kv
            + w.queue * queue.at(c.waiting)
            + w.in_flight * flight.at(c.in_flight)
            + w.prefill * prefill.at(c.awaiting)
            + w.rtt * c.rtt_score
            + w.prefix * prefix
            + w.lora * lora_of(c.index))
            * inv_total;
        // Validated weights keep this finite; if it is not, rank the endpoint last rather than
        // let a NaN break the comparison.
        c.score = if session == Some(c.index) && !guarded {
            SESSION_SCORE
        } else if score.is_finite() {
            score
        } else {
            0.0
        };
    }
}

/// A count scaled between the candidates' minimum (1) and maximum (0); 1 for everyone when
/// all are equal. The division is done once per pick, not per candidate.
#[derive(Debug, Clone, Copy)]
struct Scale {
    max: u32,
    inv_range: f64,
}

impl Scale {
    fn of(it: impl Iterator<Item = u32>) -> Scale {
        let (min, max) = it.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        Scale {
            max,
            inv_range: if max > min {
                1.0 / f64::from(max - min)
            } else {
                0.0
            },
        }
    }

    fn at(&self, v: u32) -> f64 {
        if self.inv_range == 0.0 {
            1.0
        } else {
            f64::from(self.max.saturating_sub(v)) * self.inv_range
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::InFlight;
    use crate::profile::LoadSample;
    use fleetpick_config::FleetConfig;
    use std::time::Duration;

    fn fleet(n: usize) -> Fleet {
        let ips: Vec<String> = (0..n).map(|i| format!("10.0.0.{}", i + 1)).collect();
        let text = format!(
            "clusters: [{{name: a}}]\npools:\n  - {{name: p, models: [m], target_port: 8000, endpoints: {{a: [{}]}}}}\n  - {{name: q, models: [other], target_port: 8000, endpoints: {{a: [10.9.0.1]}}}}\n",
            ips.join(", ")
        );
        Fleet::new(&FleetConfig::parse(&text, "t").unwrap())
    }

    fn set(f: &Fleet, i: usize, kv: f64, waiting: u32) {
        let s = LoadSample {
            kv_usage: kv,
            waiting,
            running: 0,
            ..LoadSample::default()
        };
        f.endpoints[i].load.store(&s, f.clock.now_ms());
    }

    #[test]
    fn a_queue_threshold_saturates_at_exactly_its_value() {
        for threshold in [1, 5, 93, 99, 105] {
            let mut policy = ClusterPolicy::default();
            policy.limits.queue_threshold = threshold;
            let capacity = Capacity::new(&policy);
            let load = |waiting| Load {
                kv_usage: 0.0,
                waiting,
                running: 0,
            };
            assert_eq!(capacity.free(&load(0), 0, 0), threshold, "{threshold}");
            assert_eq!(capacity.free(&load(threshold - 1), 0, 0), 1, "{threshold}");
            assert_eq!(capacity.free(&load(threshold), 0, 0), 0, "{threshold}");
        }
    }

    fn req(model: &str) -> PickRequest<'_> {
        PickRequest {
            model: Some(model),
            subset: None,
            explain: false,
            prefix: &[],
            session: None,
            sheddable: false,
        }
    }

    #[test]
    fn least_loaded_wins() {
        let f = fleet(3);
        set(&f, 0, 0.5, 3);
        set(&f, 1, 0.1, 0);
        set(&f, 2, 0.9, 8);
        let mut rng = fastrand::Rng::with_seed(1);
        let p = pick(&f, &req("m"), &Weights::default(), 2, &mut rng).unwrap();
        assert_eq!(p.primary, 1);
        assert_eq!(p.fallbacks, vec![0, 2]);
    }

    #[test]
    fn high_kv_gets_nothing_while_others_idle() {
        let f = fleet(4);
        set(&f, 0, 0.95, 0);
        for i in 1..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..200 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            assert_ne!(p.primary, 0);
        }
    }

    #[test]
    fn ties_are_broken_at_random() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(3);
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[pick(&f, &req("m"), &Weights::default(), 0, &mut rng)
                .unwrap()
                .primary] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn in_flight_spreads_a_burst_between_polls() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(4);
        let mut guards = Vec::new();
        for _ in 0..8 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            guards.push(InFlight::new(f.endpoints[p.primary].clone()));
        }
        for e in &f.endpoints[..4] {
            assert_eq!(e.in_flight.load(std::sync::atomic::Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn prefill_steers_away_from_endpoints_still_waiting_for_first_tokens() {
        let f = fleet(2);
        set(&f, 0, 0.0, 0);
        set(&f, 1, 0.0, 0);
        // Both have one request in flight; endpoint 0's has not produced its first token yet.
        let waiting = InFlight::new(f.endpoints[0].clone());
        let mut streaming = InFlight::new(f.endpoints[1].clone());
        streaming.first_token();
        let mut rng = fastrand::Rng::with_seed(6);
        for _ in 0..50 {
            assert_eq!(
                pick(&f, &req("m"), &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary,
                1
            );
        }
        // With the scorer off, the two tie again and share the picks.
        let off = Weights {
            prefill: 0.0,
            ..Weights::default()
        };
        let zeros = (0..200)
            .filter(|_| pick(&f, &req("m"), &off, 0, &mut rng).unwrap().primary == 0)
            .count();
        assert!((50..150).contains(&zeros), "{zeros}");
        drop((waiting, streaming));
    }

    #[test]
    fn filters_model_subset_and_staleness() {
        let f = fleet(3);
        set(&f, 0, 0.0, 0);
        set(&f, 1, 0.0, 0);
        let mut rng = fastrand::Rng::with_seed(5);
        // Endpoint 2 never scraped: never picked. The other pool's endpoint (3) is not a candidate.
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 5, &mut rng).unwrap();
            assert!(p.primary < 2 && p.fallbacks.iter().all(|&i| i < 2), "{p:?}");
        }
        assert_eq!(
            pick(&f, &req("nope"), &Weights::default(), 0, &mut rng),
            Err(PickError::UnknownModel("nope".into()))
        );
        let subset = [f.endpoints[1].addr];
        let r = PickRequest {
            model: Some("m"),
            subset: Some(&subset),
            explain: false,
            prefix: &[],
            session: None,
            sheddable: false,
        };
        assert_eq!(
            pick(&f, &r, &Weights::default(), 3, &mut rng).unwrap(),
            Pick {
                primary: 1,
                fallbacks: vec![],
                tier: Tier::Local,
                dry_run: None,
                cap: u32::MAX,
                explain: None,
            }
        );
        let outside = ["10.200.0.1:1".parse().unwrap()];
        let r = PickRequest {
            model: Some("m"),
            subset: Some(&outside),
            explain: false,
            prefix: &[],
            session: None,
            sheddable: false,
        };
        assert!(matches!(
            pick(&f, &r, &Weights::default(), 0, &mut rng),
            Err(PickError::NoEndpoint(_))
        ));
        f.endpoints[0].load.fail();
        f.endpoints[1].load.fail();
        assert!(matches!(
            pick(&f, &req("m"), &Weights::default(), 0, &mut rng),
            Err(PickError::NoEndpoint(_))
        ));
    }

    /// Three clusters (endpoints listed in that order): `near` (10.0.0.1-2) in the picker's
    /// region r1, `far` (10.1.0.1-2) in r2
    /// at 10 ms, `farther` (10.2.0.1-2) in r3 at 80 ms; `imports` appended as given.
    fn regions(imports: &str) -> Fleet {
        let text = format!(
            "picker: {{region: r1}}\nclusters:\n  - {{name: near, region: r1, labels: {{tier: a}}}}\n  - {{name: far, region: r2, rtt_ms: 10, labels: {{tier: b}}}}\n  - {{name: farther, region: r3, rtt_ms: 80, labels: {{tier: b}}}}\npools:\n  - {{name: p, models: [m], target_port: 8000, endpoints: {{near: [10.0.0.1, 10.0.0.2], far: [10.1.0.1, 10.1.0.2], farther: [10.2.0.1, 10.2.0.2]}}}}\n{imports}"
        );
        let f = Fleet::new(&FleetConfig::parse(&text, "t").unwrap());
        for i in 0..f.endpoints.len() {
            set(&f, i, 0.1, 0);
        }
        f
    }

    fn cluster_of(f: &Fleet, p: &Pick) -> String {
        f.clusters[f.endpoints[p.primary].cluster].name.clone()
    }

    #[test]
    fn local_region_first_then_spill_to_the_nearest_then_saturated() {
        let f = regions("");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            assert_eq!((cluster_of(&f, &p).as_str(), p.tier), ("near", Tier::Local));
        }
        // Local queues at the threshold (5 waiting): spill, to the nearer remote region.
        set(&f, 0, 0.1, 5);
        set(&f, 1, 0.1, 9);
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            assert_eq!((cluster_of(&f, &p).as_str(), p.tier), ("far", Tier::Spill));
        }
        // KV past 0.8 saturates too; with everything saturated, kv-cache mode still serves.
        for i in 2..6 {
            set(&f, i, 0.85, 0);
        }
        let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!(p.tier, Tier::Saturated);
        // One local endpoint with room again: back home at once.
        set(&f, 1, 0.1, 0);
        let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!((p.primary, p.tier), (1, Tier::Local));
    }

    fn lora_fleet(pool_extra: &str) -> Fleet {
        let text = format!(
            "clusters: [{{name: a}}]\npools:\n  - {{name: p, models: [base], lora_adapters: [ad], target_port: 8000, endpoints: {{a: [10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4]}}{pool_extra}}}\n"
        );
        let f = Fleet::new(&FleetConfig::parse(&text, "t").unwrap());
        for i in 0..4 {
            set(&f, i, 0.2, 0);
        }
        f
    }

    fn lora(f: &Fleet, i: usize, running: &[&str], waiting: &[&str], max_lora: u32) {
        f.endpoints[i].store_lora(Some(&LoraInfo {
            running: running.iter().map(|a| a.to_string()).collect(),
            waiting: waiting.iter().map(|a| a.to_string()).collect(),
            max_lora,
        }));
    }

    #[test]
    fn adapters_go_where_they_run_then_to_a_free_slot_then_where_they_wait() {
        let f = lora_fleet("");
        let mut rng = fastrand::Rng::with_seed(3);
        let mut picks = |model: &str| -> std::collections::BTreeSet<usize> {
            (0..60)
                .map(|_| {
                    pick(&f, &req(model), &Weights::default(), 0, &mut rng)
                        .unwrap()
                        .primary
                })
                .collect()
        };
        // 0: full of other adapters, `ad` waiting; 1: full, `ad` not even waiting;
        // 2: a free slot; 3: running `ad`.
        lora(&f, 0, &["x", "y"], &["ad"], 2);
        lora(&f, 1, &["x", "y"], &[], 2);
        lora(&f, 2, &["x"], &[], 2);
        lora(&f, 3, &["ad", "x"], &[], 2);
        assert_eq!(picks("ad"), [3].into());
        // The base model has no adapter to follow: every endpoint is alike to it.
        assert_eq!(picks("base").len(), 4);
        lora(&f, 3, &["x", "y"], &[], 2);
        assert_eq!(picks("ad"), [2].into());
        lora(&f, 2, &["x", "y"], &[], 2);
        assert_eq!(picks("ad"), [0].into());
        // Load still counts: the adapter's endpoint with a long queue loses to a free slot.
        lora(&f, 2, &["x"], &[], 2);
        lora(&f, 3, &["ad"], &[], 2);
        set(&f, 3, 0.95, 12);
        assert_eq!(picks("ad"), [2].into());
    }

    #[test]
    fn per_pool_weights_switch_a_scorer_off_for_that_pool_only() {
        let f = lora_fleet(", weights: {lora: 0}");
        lora(&f, 3, &["ad"], &[], 4);
        let mut rng = fastrand::Rng::with_seed(4);
        let spread: std::collections::BTreeSet<usize> = (0..100)
            .map(|_| {
                pick(&f, &req("ad"), &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary
            })
            .collect();
        assert_eq!(spread.len(), 4, "no adapter affinity with lora: 0");
    }

    #[test]
    fn sheddable_requests_see_only_their_share_of_the_capacity() {
        let text = "clusters: [{name: a}]\npools:\n  - {name: p, models: [m], target_port: 8000, endpoints: {a: [10.0.0.1, 10.0.0.2]}}\nimports: [{pool: p, policy: {queue_threshold: 4, sheddable_capacity: 0.5}}]\n";
        let f = Fleet::new(&FleetConfig::parse(text, "t").unwrap());
        set(&f, 0, 0.1, 2);
        set(&f, 1, 0.1, 3);
        let mut rng = fastrand::Rng::with_seed(9);
        let normal = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!(normal.tier, Tier::Local, "room under 4 waiting");
        let shed = PickRequest {
            sheddable: true,
            ..req("m")
        };
        let p = pick(&f, &shed, &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!(
            p.tier,
            Tier::Saturated,
            "no room under 2 waiting: kept for the others"
        );
        set(&f, 0, 0.1, 1);
        let p = pick(&f, &shed, &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!((p.primary, p.tier), (0, Tier::Local));
    }

    #[test]
    fn the_saturation_detector_counts_room_under_the_thresholds() {
        let f = fleet(4);
        set(&f, 0, 0.1, 0); // 5 below the default queue threshold of 5
        set(&f, 1, 0.1, 3); // 2
        set(&f, 2, 0.9, 0); // KV past 0.8: none
        set(&f, 3, 0.1, 7); // queue past 5: none
        assert_eq!(free_slots(&f, 0), 7);
        // This picker's requests still waiting for a first token count as queued.
        let held: Vec<InFlight> = (0..4)
            .map(|_| InFlight::new(f.endpoints[0].clone()))
            .collect();
        assert_eq!(free_slots(&f, 0), 3);
        drop(held);
        // Stale data counts as saturated.
        f.endpoints[0].load.fail();
        f.endpoints[1].load.fail();
        assert_eq!(free_slots(&f, 0), 0);
        assert_eq!(free_slots_per_cluster(&f, 0), vec![0]);
    }

    #[test]
    fn a_session_stays_on_its_endpoint_until_it_is_overloaded() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.1, 0);
        }
        let mut rng = fastrand::Rng::with_seed(5);
        let r = PickRequest {
            session: Some(2),
            sheddable: false,
            ..req("m")
        };
        // Even with another endpoint clearly less loaded.
        set(&f, 2, 0.5, 2);
        for _ in 0..50 {
            let p = pick(&f, &r, &Weights::default(), 1, &mut rng).unwrap();
            assert_eq!(p.primary, 2);
            assert_ne!(p.fallbacks, vec![2]);
        }
        // Overloaded (queue past the guard): the session moves.
        set(&f, 2, 0.5, 8);
        assert_ne!(
            pick(&f, &r, &Weights::default(), 0, &mut rng)
                .unwrap()
                .primary,
            2
        );
        // Stale (down): the session moves, and nothing fails.
        f.endpoints[2].load.fail();
        assert_ne!(
            pick(&f, &r, &Weights::default(), 0, &mut rng)
                .unwrap()
                .primary,
            2
        );
    }

    #[test]
    fn requests_follow_their_prefix_until_the_holder_is_loaded_then_a_second_holder_takes_them() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.1, 0);
        }
        let system = vec![b's'; 64 * 40];
        let hashes = crate::prefix::prompt_hashes("m", None, &system);
        f.prefix.record(2, &hashes);
        let r = PickRequest {
            model: Some("m"),
            subset: None,
            explain: false,
            prefix: &hashes,
            session: None,
            sheddable: false,
        };
        let mut rng = fastrand::Rng::with_seed(15);
        for _ in 0..50 {
            assert_eq!(
                pick(&f, &r, &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary,
                2
            );
        }
        // A prompt nobody holds spreads as before.
        let other = crate::prefix::prompt_hashes("m", None, &[b'q'; 64 * 40]);
        let r2 = PickRequest {
            prefix: &other,
            session: None,
            sheddable: false,
            ..r
        };
        let spread: std::collections::BTreeSet<usize> = (0..100)
            .map(|_| {
                pick(&f, &r2, &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary
            })
            .collect();
        assert_eq!(spread.len(), 4);
        // The holder's queue grows well past the others': the load guard sends the prefix
        // elsewhere, and the new holder keeps it from then on.
        let r = PickRequest {
            model: Some("m"),
            subset: None,
            explain: false,
            prefix: &hashes,
            session: None,
            sheddable: false,
        };
        set(&f, 2, 0.1, 6);
        let second = pick(&f, &r, &Weights::default(), 0, &mut rng)
            .unwrap()
            .primary;
        assert_ne!(second, 2);
        f.prefix.record(second, &hashes);
        for _ in 0..50 {
            assert_eq!(
                pick(&f, &r, &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary,
                second
            );
        }
        // With the scorer off, affinity is gone.
        let off = Weights {
            prefix: 0.0,
            ..Weights::default()
        };
        set(&f, 2, 0.1, 0);
        let spread: std::collections::BTreeSet<usize> = (0..100)
            .map(|_| pick(&f, &r, &off, 0, &mut rng).unwrap().primary)
            .collect();
        assert_eq!(spread.len(), 4);
    }

    #[test]
    fn host_jitter_in_measured_round_trips_does_not_break_ties() {
        let f = regions("");
        // Measured (not configured) round trips: 0.3 and 0.9 ms in `near`.
        f.endpoints[0].observe_rtt(Duration::from_micros(300));
        f.endpoints[1].observe_rtt(Duration::from_micros(900));
        f.update_cluster_health();
        assert_eq!(f.cluster_rtt_ms(0), 0.0);
        assert_eq!(f.cluster_rtt_ms(2), 80.0);
        let mut rng = fastrand::Rng::with_seed(14);
        let ones = (0..200)
            .filter(|_| {
                pick(&f, &req("m"), &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary
                    == 1
            })
            .count();
        assert!((50..150).contains(&ones), "{ones}");
    }

    #[test]
    fn fallbacks_end_in_another_cluster() {
        let f = regions("");
        let mut rng = fastrand::Rng::with_seed(8);
        for n in 1..4 {
            let p = pick(&f, &req("m"), &Weights::default(), n, &mut rng).unwrap();
            assert_eq!(cluster_of(&f, &p), "near");
            assert_eq!(p.fallbacks.len(), n);
            let last = *p.fallbacks.last().unwrap();
            assert_ne!(f.endpoints[last].cluster, 0, "{p:?}");
            if n >= 2 {
                // The other local endpoint is the first fallback: same tier, best score.
                assert_eq!(f.endpoints[p.fallbacks[0]].cluster, 0, "{p:?}");
            }
        }
    }

    #[test]
    fn capacity_scaler_zero_drains_a_cluster_by_label() {
        let f = regions(
            "imports:\n  - pool: p\n    policy:\n      scopes:\n        - {match_labels: {tier: a}, capacity_scaler: 0}\n",
        );
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 2, &mut rng).unwrap();
            // Drained: not even a fallback; the nearest remote region serves (spill).
            assert_eq!((cluster_of(&f, &p).as_str(), p.tier), ("far", Tier::Spill));
            assert!(
                p.fallbacks.iter().all(|&i| f.endpoints[i].cluster != 0),
                "{p:?}"
            );
        }
        for i in 2..6 {
            f.endpoints[i].load.fail();
        }
        assert_eq!(
            pick(&f, &req("m"), &Weights::default(), 0, &mut rng),
            Err(PickError::NoEndpoint(
                "every fresh endpoint is drained (capacity_scaler 0)"
            ))
        );
    }

    #[test]
    fn in_flight_mode_caps_each_endpoint_and_then_refuses() {
        let f = regions(
            "imports:\n  - pool: p\n    policy: {balancing: in-flight, max_in_flight_per_endpoint: 2}\n",
        );
        let mut rng = fastrand::Rng::with_seed(10);
        let mut guards = Vec::new();
        let mut tiers = Vec::new();
        for _ in 0..12 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            tiers.push(p.tier);
            guards.push(InFlight::try_new(f.endpoints[p.primary].clone(), 2).unwrap());
        }
        // Local first (four), then the rest spill; nobody past two.
        assert_eq!(tiers[..4], [Tier::Local; 4]);
        assert_eq!(tiers[4..], [Tier::Spill; 8]);
        for e in &f.endpoints {
            assert_eq!(e.in_flight.load(Ordering::Relaxed), 2);
        }
        assert_eq!(
            pick(&f, &req("m"), &Weights::default(), 0, &mut rng),
            Err(PickError::AtCapacity)
        );
        assert!(InFlight::try_new(f.endpoints[0].clone(), 2).is_none());
        guards.pop();
        assert!(pick(&f, &req("m"), &Weights::default(), 0, &mut rng).is_ok());
    }

    #[test]
    fn dry_run_changes_nothing_but_reports() {
        let f = regions(
            "imports:\n  - pool: p\n    policy:\n      dry_run: true\n      scopes:\n        - {match_labels: {tier: a}, capacity_scaler: 0}\n",
        );
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            assert_eq!(cluster_of(&f, &p), "near");
            assert_eq!(p.dry_run, Some(Verdict::Drained));
        }
        // Every endpoint at the dry-run policy's cap: it would have refused the request.
        let f2 = regions(
            "imports:\n  - pool: p\n    policy: {dry_run: true, balancing: in-flight, max_in_flight_per_endpoint: 1}\n",
        );
        let _held: Vec<InFlight> = f2
            .endpoints
            .iter()
            .map(|e| InFlight::new(e.clone()))
            .collect();
        let p = pick(&f2, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!((p.dry_run, p.cap), (Some(Verdict::Reject), u32::MAX));
        // Not dry: the verdict is not reported at all.
        let f = regions("");
        let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!(p.dry_run, None);
    }

    #[test]
    fn a_cluster_that_failed_waits_out_its_recovery() {
        use crate::fleet::ClusterHealth::*;
        assert_eq!(Starting.next(false, 0, 1000), Starting);
        assert_eq!(Starting.next(true, 0, 1000), Up);
        assert_eq!(Up.next(false, 5, 1000), Down);
        assert_eq!(Down.next(true, 5, 1000), Recovering);
        assert_eq!(Recovering.next(true, 999, 1000), Recovering);
        assert_eq!(Recovering.next(false, 999, 1000), Down);
        assert_eq!(Recovering.next(true, 1000, 1000), Up);
        assert!(Up.serves() && Starting.serves() && !Down.serves() && !Recovering.serves());

        let f = regions("scheduler: {cluster_recovery_ms: 600000}\n");
        assert!(f.update_cluster_health().len() == 3, "all three start up");
        f.endpoints[0].load.fail();
        f.endpoints[1].load.fail();
        assert_eq!(f.update_cluster_health(), vec![(0, Down)]);
        // Fresh again, but recovering for ten minutes: the far region serves meanwhile.
        set(&f, 0, 0.0, 0);
        assert_eq!(f.update_cluster_health(), vec![(0, Recovering)]);
        let mut rng = fastrand::Rng::with_seed(12);
        let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!((cluster_of(&f, &p).as_str(), p.tier), ("far", Tier::Spill));
        // With nothing else fresh, a recovering cluster serves rather than nobody.
        for i in 2..6 {
            f.endpoints[i].load.fail();
        }
        let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
        assert_eq!((p.primary, p.tier), (0, Tier::LastResort));
    }

    #[test]
    fn explain_names_every_cluster_and_why() {
        let f = regions(
            "imports:\n  - pool: p\n    policy:\n      scopes:\n        - {match_labels: {tier: b}, capacity_scaler: 0}\n",
        );
        f.endpoints[1].load.fail();
        let r = PickRequest {
            model: Some("m"),
            subset: None,
            explain: true,
            prefix: &[],
            session: None,
            sheddable: false,
        };
        let mut rng = fastrand::Rng::with_seed(13);
        let p = pick(&f, &r, &Weights::default(), 0, &mut rng).unwrap();
        let text = p.explain.unwrap().to_string();
        assert!(
            text.starts_with("near (starting): 1/2 in tier, 1 stale; far (starting): 0/2 in tier, 2 drained; farther"),
            "{text}"
        );
        assert!(text.contains("| top: 10.0.0.1:8000@near="), "{text}");
    }
}
