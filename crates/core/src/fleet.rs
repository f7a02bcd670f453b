//! The live model of the fleet: clusters, pools and endpoints (as the fleet file says; a reload
//! makes the next generation, see [`Fleet::successor`]), and each endpoint's load as last
//! scraped plus the requests this picker has in flight there.
//!
//! The request path never waits on the poller: each endpoint's scraped load is one 64-bit word
//! (KV use, queue, batch) and one timestamp, replaced atomically by the poller, so a pick reads a
//! consistent per-endpoint snapshot with two atomic loads and no lock. In-flight counts are
//! atomics too, raised at pick and lowered by an [`InFlight`] guard whose drop is the only
//! release: exactly once, however the request ends.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::profile::{EngineKind, LoadSample, LoraInfo};
use crate::queue::{FlowQueue, QueueLimits};
use crate::rewrite::Rewrites;
use crate::session::Sessions;
use fleetpick_config::{
    ClusterPolicy, ClusterSpec, FleetConfig, PollerSettings, PoolPolicy, Weights,
};

/// Milliseconds on a monotonic clock shared by the poller and the request path.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Never 0: 0 marks "no data" in a [`LoadCell`].
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// An endpoint's load, as one word: KV use in 1/10,000 (16 bits), waiting (24 bits), running
/// (24 bits); counts beyond 24 bits saturate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub kv_usage: f64,
    pub waiting: u32,
    pub running: u32,
}

const COUNT_MAX: u32 = (1 << 24) - 1;

impl Load {
    fn pack(&self) -> u64 {
        let kv = (self.kv_usage.clamp(0.0, 1.0) * 10_000.0).round() as u64;
        kv | (u64::from(self.waiting.min(COUNT_MAX)) << 16)
            | (u64::from(self.running.min(COUNT_MAX)) << 40)
    }

    fn unpack(w: u64) -> Load {
        Load {
            kv_usage: (w & 0xffff) as f64 / 10_000.0,
            waiting: ((w >> 16) & u64::from(COUNT_MAX)) as u32,
            running: ((w >> 40) & u64::from(COUNT_MAX)) as u32,
        }
    }
}

/// The last scrape of one endpoint.
#[derive(Debug, Default)]
pub struct LoadCell {
    word: AtomicU64,
    /// [`Clock::now_ms`] of the last good scrape; 0 after a failed one.
    scraped_at_ms: AtomicU64,
    /// Consecutive failed scrapes.
    failures: AtomicU32,
    /// [`Clock::now_ms`] of the last good scrape, kept through failures (for the data's age).
    last_good_ms: AtomicU64,
}

impl LoadCell {
    pub fn store(&self, sample: &LoadSample, now_ms: u64) {
        let load = Load {
            kv_usage: sample.kv_usage,
            waiting: sample.waiting,
            running: sample.running,
        };
        self.word.store(load.pack(), Ordering::Relaxed);
        self.scraped_at_ms.store(now_ms, Ordering::Release);
        self.last_good_ms.store(now_ms, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
    }

    /// How old the last good scrape is at `now_ms` (`None`: there was none).
    pub fn age_ms(&self, now_ms: u64) -> Option<u64> {
        match self.last_good_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(now_ms.saturating_sub(at)),
        }
    }

    /// Marks a failed scrape: the endpoint is ineligible until a good one. Returns the number of
    /// consecutive failures.
    pub fn fail(&self) -> u32 {
        self.scraped_at_ms.store(0, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The load if it is fresh at `now_ms`, else `None`.
    pub fn fresh(&self, now_ms: u64, stale_after_ms: u64) -> Option<Load> {
        let at = self.scraped_at_ms.load(Ordering::Acquire);
        if at == 0 || now_ms.saturating_sub(at) > stale_after_ms {
            return None;
        }
        Some(Load::unpack(self.word.load(Ordering::Relaxed)))
    }

    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The resolution of round trips in scheduling: differences below it are noise next to the
/// time a request spends in the engine.
pub const RTT_QUANTUM_MS: f64 = 5.0;

/// One model-server endpoint, in one generation of the fleet (its indices are that
/// generation's).
#[derive(Debug)]
pub struct Endpoint {
    /// Its position in [`Fleet::endpoints`].
    pub index: usize,
    pub addr: SocketAddr,
    /// `addr` as text, made once: it is written into every destination header.
    pub addr_text: String,
    pub cluster: usize,
    pub pool: usize,
    pub engine: EngineKind,
    pub metrics_url: String,
    /// What it carries from one generation of the fleet to the next (see [`Fleet::successor`]).
    pub state: Arc<EndpointState>,
}

/// An endpoint's live state: shared by every generation of the fleet that has the endpoint (same
/// address, same pool), so that a reload keeps its load and loses no in-flight count: a request
/// picked before the reload releases the very counter the new generation reads.
#[derive(Debug, Default)]
pub struct EndpointState {
    pub load: LoadCell,
    /// Requests this picker sent here that have not ended.
    pub in_flight: AtomicU32,
    /// Of those, the ones still waiting for their first token (queued or in prefill).
    pub awaiting_first_token: AtomicU32,
    /// Round trip of the last scrapes, in microseconds, smoothed (0: none measured yet).
    pub scrape_rtt_us: AtomicU32,
    /// The LoRA adapters running and waiting at the last scrape (`None`: not reported).
    pub lora: arc_swap::ArcSwapOption<LoraInfo>,
}

/// An endpoint reads as its live state (`ep.load`, `ep.in_flight`): the state is what every
/// reader of an endpoint wants, and it sits behind an `Arc` only so it can outlive a generation.
impl std::ops::Deref for Endpoint {
    type Target = EndpointState;

    fn deref(&self) -> &EndpointState {
        &self.state
    }
}

impl EndpointState {
    /// Keeps the LoRA state of a scrape; replaced only when it changed, so steady state costs
    /// no allocation.
    pub fn store_lora(&self, lora: Option<&LoraInfo>) {
        if self.lora.load().as_deref() != lora {
            self.lora.store(lora.cloned().map(Arc::new));
        }
    }

    /// Folds one scrape's round trip into the smoothed value (weight 1/8 for the new one, as
    /// TCP's SRTT does): one slow scrape does not make a near cluster look far.
    pub fn observe_rtt(&self, rtt: std::time::Duration) {
        let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1);
        let old = self.scrape_rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            us
        } else {
            ((u64::from(old) * 7 + u64::from(us)) / 8) as u32
        };
        self.scrape_rtt_us.store(new.max(1), Ordering::Relaxed);
    }
}

/// Whether a cluster takes new requests. A cluster whose endpoints all fail or go stale is
/// `Down` at once; it is back `Up` only after `cluster_recovery_ms` of fresh data
/// (`Recovering` in between), so a flapping cluster does not take traffic between failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClusterHealth {
    /// No endpoint has answered yet since start: endpoints count on their own freshness.
    Starting = 0,
    Up = 1,
    Down = 2,
    Recovering = 3,
}

impl ClusterHealth {
    fn from_u8(v: u8) -> ClusterHealth {
        match v {
            1 => ClusterHealth::Up,
            2 => ClusterHealth::Down,
            3 => ClusterHealth::Recovering,
            _ => ClusterHealth::Starting,
        }
    }

    /// The next state, given whether any endpoint is fresh now and how long the current state
    /// has lasted.
    pub fn next(self, any_fresh: bool, held_ms: u64, recovery_ms: u64) -> ClusterHealth {
        use ClusterHealth::*;
        match (self, any_fresh) {
            (Starting, true) => Up,
            (Starting, false) => Starting,
            (Up, true) => Up,
            (Up | Recovering, false) => Down,
            (Down, false) => Down,
            (Down, true) => Recovering,
            (Recovering, true) if held_ms >= recovery_ms => Up,
            (Recovering, true) => Recovering,
        }
    }

    /// New requests may go there.
    pub fn serves(self) -> bool {
        matches!(self, ClusterHealth::Starting | ClusterHealth::Up)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClusterHealth::Starting => "starting",
            ClusterHealth::Up => "up",
            ClusterHealth::Down => "down",
            ClusterHealth::Recovering => "recovering",
        }
    }
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub region: String,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Configured round trip from the picker, if any (else the endpoints' measured one).
    pub rtt_ms: Option<f64>,
    /// In this picker's region (every cluster is, when the picker has no region).
    pub local: bool,
    /// The smallest smoothed scrape round trip among its fresh endpoints, in microseconds
    /// (0: none yet); refreshed with the cluster's health.
    measured_rtt_us: AtomicU32,
    health: AtomicU8,
    health_since_ms: AtomicU64,
}

impl Cluster {
    pub fn health(&self) -> ClusterHealth {
        ClusterHealth::from_u8(self.health.load(Ordering::Acquire))
    }

    /// The cluster of `spec`, keeping what `old` (the same cluster in the previous generation)
    /// learned: its health, since when, and its measured round trip.
    fn carried(spec: &ClusterSpec, local: bool, old: Option<&Cluster>) -> Cluster {
        Cluster {
            name: spec.name.clone(),
            region: spec.region.clone(),
            zone: spec.zone.clone(),
            labels: spec.labels.clone(),
            rtt_ms: spec.rtt_ms,
            local,
            measured_rtt_us: AtomicU32::new(
                old.map_or(0, |c| c.measured_rtt_us.load(Ordering::Relaxed)),
            ),
            health: AtomicU8::new(old.map_or(ClusterHealth::Starting as u8, |c| {
                c.health.load(Ordering::Acquire)
            })),
            health_since_ms: AtomicU64::new(
                old.map_or(0, |c| c.health_since_ms.load(Ordering::Relaxed)),
            ),
        }
    }
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub endpoints: Vec<usize>,
    /// The pool's own scorer weights (`None`: the scheduler's).
    pub weights: Option<Weights>,
    /// Session affinity, when the pool has it.
    pub sessions: Option<Sessions>,
    /// Flow control's queue, when flow control is on.
    pub queue: Option<Arc<FlowQueue>>,
}

/// An InferenceObjective, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub name: String,
    pub pool: usize,
    pub priority: i32,
}

/// The backend policy of every pool, per cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    /// By pool index; `None` when the pool is not imported (it serves nothing then).
    pub pools: Vec<Option<PoolPolicy>>,
}

impl Policies {
    /// The policy enforced for `pool` in `cluster`: the configured one, or the default during
    /// a dry run.
    pub fn enforced(&self, pool: usize, cluster: usize) -> ClusterPolicy {
        match self.pools.get(pool) {
            Some(Some(p)) if !p.dry_run => p.per_cluster[cluster],
            _ => ClusterPolicy::default(),
        }
    }

    /// The configured policy for `pool` in `cluster` when it is a dry run (reported, not
    /// enforced).
    pub fn dry_run(&self, pool: usize, cluster: usize) -> Option<ClusterPolicy> {
        match self.pools.get(pool) {
            Some(Some(p)) if p.dry_run => Some(p.per_cluster[cluster]),
            _ => None,
        }
    }
}

/// The fleet: topology from the fleet file, live load per endpoint. One value per generation:
/// a reloaded fleet file makes the next one ([`Fleet::successor`]), and readers hold the
/// generation they started with (a request keeps its indices consistent to its end).
#[derive(Debug)]
pub struct Fleet {
    /// 0 for the fleet of the first load, one more for each reload applied.
    pub generation: u64,
    pub clusters: Vec<Cluster>,
    pub pools: Vec<Pool>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Served model name: (pool, is a LoRA adapter).
    model_pool: HashMap<String, (usize, bool)>,
    /// Client-facing names served as other models.
    pub rewrites: Rewrites,
    /// InferenceObjectives by name.
    pub objectives: HashMap<String, Objective>,
    /// The objective a model's requests take when they name none.
    objective_of_model: HashMap<String, String>,
    /// Endpoints by their session-cookie token (see [`crate::session::endpoint_token`]).
    by_token: HashMap<u64, usize>,
    pub clock: Clock,
    pub poller: PollerSettings,
    /// The picker's region, if it has one.
    pub region: Option<String>,
    pub cluster_recovery_ms: u64,
    /// The scheduler's weights (a pool may have its own, see [`Fleet::weights_for`]).
    pub weights: Weights,
    /// Endpoints listed after the primary for Envoy's retries.
    pub fallbacks: usize,
    pub policies: Policies,
    /// Which endpoint holds which prompt prefix, as this picker's picks left them.
    pub prefix: crate::prefix::PrefixIndex,
    /// The state of endpoints that left the fleet while requests were still in flight there
    /// (held by those requests' guards; an entry dies with the last of them): an endpoint that
    /// comes back before then takes up its live counts again.
    departed: HashMap<(SocketAddr, String), std::sync::Weak<EndpointState>>,
}

/// The current generation of the fleet, replaced whole on reload.
pub type FleetCell = arc_swap::ArcSwap<Fleet>;

impl Fleet {
    /// The fleet of `cfg`, for a picker in the region the file names (none: every cluster is
    /// local).
    pub fn new(cfg: &FleetConfig) -> Fleet {
        Fleet::build(cfg, None)
    }

    /// The fleet of a reloaded `cfg`, taking over what this generation learned and holds: each
    /// endpoint that stays (same address, same pool) keeps its [`EndpointState`] (load,
    /// in-flight counts), each cluster that stays (same name) its health, the prefix index and
    /// header sessions their entries for the endpoints that stay, each pool that keeps flow
    /// control its queue (with the requests waiting in it, under the new bounds). The clock is the same, so load
    /// timestamps stay comparable.
    pub fn successor(&self, cfg: &FleetConfig) -> Fleet {
        Fleet::build(cfg, Some(self))
    }

    fn build(cfg: &FleetConfig, prev: Option<&Fleet>) -> Fleet {
        let file = &cfg.file;
        let region = file.picker.region.clone();
        let (endpoints, moved) = carried_endpoints(cfg, prev);
        Fleet {
            generation: prev.map_or(0, |f| f.generation + 1),
            clusters: file
                .clusters
                .iter()
                .map(|c| {
                    let old = prev.and_then(|f| f.clusters.iter().find(|o| o.name == c.name));
                    let local = region.as_ref().is_none_or(|r| *r == c.region);
                    Cluster::carried(c, local, old)
                })
                .collect(),
            pools: pools_of(cfg, prev, &endpoints, &moved),
            model_pool: models_of(cfg),
            rewrites: Rewrites::new(&file.rewrites),
            objectives: objectives_of(cfg),
            by_token: endpoints
                .iter()
                .map(|e| (crate::session::token_of(&e.addr_text), e.index))
                .collect(),
            objective_of_model: file
                .objectives
                .iter()
                .flat_map(|o| o.models.iter().map(|m| (m.clone(), o.name.clone())))
                .collect(),
            clock: prev.map_or_else(Clock::new, |f| f.clock),
            poller: file.poller.clone(),
            region,
            cluster_recovery_ms: file.scheduler.cluster_recovery_ms,
            weights: file.scheduler.weights,
            fallbacks: file.scheduler.fallbacks,
            policies: Policies {
                pools: cfg.policies.clone(),
            },
            prefix: match prev {
                Some(f) => f.prefix.carried(&moved, cfg.endpoints.len()),
                None => crate::prefix::PrefixIndex::new(cfg.endpoints.len()),
            },
            departed: prev.map_or_else(HashMap::new, |f| f.departed_after(cfg, &endpoints, &moved)),
            endpoints,
        }
    }

    /// The state of this generation's endpoints that its successor (`cfg`, whose endpoints are
    /// `next`) does not have, while requests still hold it; `moved` maps this generation's
    /// endpoint indices to the successor's.
    fn departed_after(
        &self,
        cfg: &FleetConfig,
        next: &[Arc<Endpoint>],
        moved: &[Option<usize>],
    ) -> HashMap<(SocketAddr, String), std::sync::Weak<EndpointState>> {
        let here: std::collections::HashSet<(SocketAddr, &str)> = next
            .iter()
            .map(|e| (e.addr, cfg.file.pools[e.pool].name.as_str()))
            .collect();
        let left = self
            .endpoints
            .iter()
            .filter(|e| moved[e.index].is_none())
            .map(|e| {
                (
                    (e.addr, self.pools[e.pool].name.clone()),
                    Arc::downgrade(&e.state),
                )
            });
        self.departed
            .clone()
            .into_iter()
            .chain(left)
            .filter(|((addr, pool), state)| {
                state.strong_count() > 0 && !here.contains(&(*addr, pool.as_str()))
            })
            .collect()
    }

    /// Ends what this generation holds that its successor does not take over: requests waiting
    /// in the queue of a pool that lost flow control (or is gone) are released to be picked now
    /// (no dispatcher will release them any more).
    pub fn retire(&self, successor: &Fleet) {
        for pool in &self.pools {
            let Some(q) = &pool.queue else { continue };
            let kept = successor
                .pools
                .iter()
                .any(|p| p.queue.as_ref().is_some_and(|n| Arc::ptr_eq(n, q)));
            if !kept {
                q.close();
            }
        }
    }

    /// Moves each cluster's health on (see [`ClusterHealth`]); the poller calls it after every
    /// round of scrapes. Returns the clusters whose state changed, with their new state.
    pub fn update_cluster_health(&self) -> Vec<(usize, ClusterHealth)> {
        let now = self.clock.now_ms();
        let mut fresh = vec![false; self.clusters.len()];
        let mut rtt = vec![u32::MAX; self.clusters.len()];
        for e in &self.endpoints {
            if e.load.fresh(now, self.poller.stale_after_ms).is_some() {
                fresh[e.cluster] = true;
                let r = e.scrape_rtt_us.load(Ordering::Relaxed);
                if r > 0 {
                    rtt[e.cluster] = rtt[e.cluster].min(r);
                }
            }
        }
        for (c, r) in self.clusters.iter().zip(&rtt) {
            if *r != u32::MAX {
                c.measured_rtt_us.store(*r, Ordering::Relaxed);
            }
        }
        let mut changed = Vec::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let was = c.health();
            let since = c.health_since_ms.load(Ordering::Relaxed);
            let next = was.next(
                fresh[i],
                now.saturating_sub(since),
                self.cluster_recovery_ms,
            );
            if next != was {
                c.health_since_ms.store(now, Ordering::Relaxed);
                c.health.store(next as u8, Ordering::Release);
                changed.push((i, next));
            }
        }
        changed
    }

    /// The round trip to `cluster` in milliseconds, as scheduling sees it: the configured
    /// one, else the measured one, rounded down to whole [`RTT_QUANTUM_MS`]. One number per
    /// cluster, coarse on purpose: sub-millisecond jitter between hosts must not decide between
    /// otherwise equal endpoints (that would send every tie to the same one).
    pub fn cluster_rtt_ms(&self, cluster: usize) -> f64 {
        let c = &self.clusters[cluster];
        let ms = c
            .rtt_ms
            .unwrap_or_else(|| f64::from(c.measured_rtt_us.load(Ordering::Relaxed)) / 1000.0);
        (ms / RTT_QUANTUM_MS).floor() * RTT_QUANTUM_MS
    }

    /// The pool serving `model`.
    pub fn pool_for(&self, model: &str) -> Option<usize> {
        self.model_pool.get(model).map(|&(p, _)| p)
    }

    /// The objective of a request for `model` (in `pool`) that names `header` (the
    /// `x-gateway-inference-objective` value, if any): the named one when it is for that
    /// pool, else the one the model takes, else none (priority 0). An unknown name, or one of
    /// another pool, counts as no name.
    pub fn objective(&self, pool: usize, model: &str, header: Option<&str>) -> Option<&Objective> {
        let of_pool = |o: &&Objective| o.pool == pool;
        header
            .and_then(|name| self.objectives.get(name))
            .filter(of_pool)
            .or_else(|| {
                self.objective_of_model
                    .get(model)
                    .and_then(|name| self.objectives.get(name))
                    .filter(of_pool)
            })
    }

    /// The weights for requests of `pool`: its own, else `default` (the scheduler's).
    pub fn weights_for<'a>(&'a self, pool: Option<usize>, default: &'a Weights) -> &'a Weights {
        pool.and_then(|p| self.pools[p].weights.as_ref())
            .unwrap_or(default)
    }

    /// A pool's name for labels and logs ("" for requests of no pool).
    pub fn pool_name(&self, pool: Option<usize>) -> &str {
        pool.map_or("", |p| self.pools[p].name.as_str())
    }

    /// The endpoint a session cookie's value names.
    pub fn endpoint_for_token(&self, value: &str) -> Option<usize> {
        self.by_token
            .get(&crate::session::parse_token(value)?)
            .copied()
    }

    /// Every model name served (base models and adapters of imported pools).
    pub fn served_models(&self) -> impl Iterator<Item = &str> {
        self.model_pool.keys().map(String::as_str)
    }

    /// Whether `model` is one of its pool's LoRA adapters.
    pub fn is_adapter(&self, model: &str) -> bool {
        self.model_pool.get(model).is_some_and(|&(_, a)| a)
    }

    /// Endpoints with fresh load data now.
    pub fn eligible_count(&self) -> usize {
        let now = self.clock.now_ms();
        self.endpoints
            .iter()
            .filter(|e| e.load.fresh(now, self.poller.stale_after_ms).is_some())
            .count()
    }
}

/// The endpoints of `cfg`, each with the live state it had in `prev` (same address, same
/// pool), or had before it left while requests still held it, or a new one; and, by `prev`'s
/// endpoint index, its index now (for the structures indexed by endpoint).
fn carried_endpoints(
    cfg: &FleetConfig,
    prev: Option<&Fleet>,
) -> (Vec<Arc<Endpoint>>, Vec<Option<usize>>) {
    let before: HashMap<(SocketAddr, &str), &Arc<Endpoint>> = prev
        .map(|f| {
            f.endpoints
                .iter()
                .map(|e| ((e.addr, f.pools[e.pool].name.as_str()), e))
                .collect()
        })
        .unwrap_or_default();
    let returning = |addr: SocketAddr, pool: &str| {
        prev.and_then(|f| f.departed.get(&(addr, pool.to_string())))
            .and_then(std::sync::Weak::upgrade)
    };
    let mut moved = vec![None; prev.map_or(0, |f| f.endpoints.len())];
    let endpoints = cfg
        .endpoints
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let pool = &cfg.file.pools[e.pool];
            let state = match before.get(&(e.addr, pool.name.as_str())) {
                Some(old) => {
                    moved[old.index] = Some(index);
                    old.state.clone()
                }
                None => returning(e.addr, &pool.name).unwrap_or_default(),
            };
            Arc::new(Endpoint {
                index,
                addr: e.addr,
                addr_text: e.addr.to_string(),
                cluster: e.cluster,
                pool: e.pool,
                engine: pool.engine,
                metrics_url: format!("http://{}{}", e.addr, pool.metrics_path),
                state,
            })
        })
        .collect();
    (endpoints, moved)
}

/// The pools of `cfg` over `endpoints`, each keeping what it had in `prev` (same name): its
/// header sessions (for the endpoints that stay, by `moved`) and its flow-control queue, with
/// the requests waiting in it, under the new bounds.
fn pools_of(
    cfg: &FleetConfig,
    prev: Option<&Fleet>,
    endpoints: &[Arc<Endpoint>],
    moved: &[Option<usize>],
) -> Vec<Pool> {
    let fc = &cfg.file.flow_control;
    let limits = QueueLimits {
        max_requests_per_band: fc.max_requests_per_band,
        max_bytes_per_band: fc.max_bytes_per_band,
        ttl: std::time::Duration::from_millis(fc.ttl_ms),
    };
    let pools = cfg.file.pools.iter().enumerate();
    pools
        .map(|(p, spec)| {
            let old = prev.and_then(|f| f.pools.iter().find(|o| o.name == spec.name));
            Pool {
                name: spec.name.clone(),
                endpoints: endpoints
                    .iter()
                    .filter(|e| e.pool == p)
                    .map(|e| e.index)
                    .collect(),
                weights: spec.weights,
                sessions: spec.session_affinity.as_ref().map(|s| {
                    match old.and_then(|o| o.sessions.as_ref()) {
                        Some(o) => o.carried(s, moved),
                        None => Sessions::new(s),
                    }
                }),
                queue: fc
                    .enabled
                    .then(|| match old.and_then(|o| o.queue.as_ref()) {
                        Some(q) => {
                            q.set_limits(limits);
                            q.clone()
                        }
                        None => FlowQueue::new(limits),
                    }),
            }
        })
        .collect()
}

/// Each served model and adapter name: its pool, and whether it is an adapter. A pool that is
/// not imported serves none of its models.
fn models_of(cfg: &FleetConfig) -> HashMap<String, (usize, bool)> {
    let mut models = HashMap::new();
    for (p, spec) in cfg.file.pools.iter().enumerate() {
        if cfg.policies[p].is_none() {
            continue;
        }
        for m in &spec.models {
            models.insert(m.clone(), (p, false));
        }
        for m in &spec.lora_adapters {
            models.insert(m.clone(), (p, true));
        }
    }
    models
}

/// The objectives of `cfg` by name, with their pools' indices.
fn objectives_of(cfg: &FleetConfig) -> HashMap<String, Objective> {
    cfg.objectives
        .iter()
        .filter_map(|o| {
            let pool = cfg.file.pools.iter().position(|p| p.name == o.pool)?;
            let objective = Objective {
                name: o.name.clone(),
                pool,
                priority: o.priority,
            };
            Some((o.name.clone(), objective))
        })
        .collect()
}

/// One request in flight at an endpoint, counted as awaiting its first token until
/// [`InFlight::first_token`]; dropping it ends the request's accounting.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    awaiting: bool,
}

impl InFlight {
    pub fn new(endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint
            .awaiting_first_token
            .fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            awaiting: true,
        }
    }

    /// Like [`InFlight::new`], unless the endpoint already has `cap` requests in flight: the
    /// check and the increment are one atomic step, so concurrent picks never pass the cap.
    pub fn try_new(endpoint: Arc<Endpoint>, cap: u32) -> Option<InFlight> {
        endpoint
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        endpoint
            .awaiting_first_token
            .fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint,
            awaiting: true,
        })
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The response's first token (its first body bytes) went by. Idempotent.
    /// Marks the first token; true the first time (the request was still awaiting it).
    pub fn first_token(&mut self) -> bool {
        let first = std::mem::take(&mut self.awaiting);
        if first {
            self.endpoint
                .awaiting_first_token
                .fetch_sub(1, Ordering::Relaxed);
        }
        first
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.first_token();
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_word_round_trips_and_saturates() {
        let l = Load {
            kv_usage: 0.4567,
            waiting: 12,
            running: 300,
        };
        assert_eq!(Load::unpack(l.pack()), l);
        let big = Load {
            kv_usage: 1.7,
            waiting: u32::MAX,
            running: 1 << 30,
        };
        let back = Load::unpack(big.pack());
        assert_eq!(
            (back.kv_usage, back.waiting, back.running),
            (1.0, COUNT_MAX, COUNT_MAX)
        );
    }

    #[test]
    fn cell_freshness_and_failure() {
        let cell = LoadCell::default();
        assert!(cell.fresh(10, 500).is_none());
        let sample = LoadSample {
            waiting: 3,
            running: 5,
            kv_usage: 0.5,
            ..LoadSample::default()
        };
        cell.store(&sample, 100);
        assert_eq!(cell.fresh(600, 500).map(|l| l.waiting), Some(3));
        assert!(cell.fresh(601, 500).is_none());
        assert_eq!(cell.fail(), 1);
        assert!(cell.fresh(101, 500).is_none());
        assert_eq!(cell.fail(), 2);
        cell.store(&sample, 700);
        assert_eq!(cell.failures(), 0);
    }

    #[test]
    fn a_successor_keeps_the_state_of_endpoints_that_stay() {
        let parse = |endpoints: &str| {
            fleetpick_config::FleetConfig::parse(
                &format!("clusters: [{{name: a}}, {{name: b}}]\npools: [{{name: p, models: [m], target_port: 80, endpoints: {endpoints}}}]\n"),
                "t",
            )
            .unwrap()
        };
        let first = Fleet::new(&parse("{a: [10.0.0.1, 10.0.0.2], b: [10.0.0.3]}"));
        first.clusters[1]
            .health
            .store(ClusterHealth::Down as u8, Ordering::Release);
        let held = InFlight::new(first.endpoints[1].clone());
        first.endpoints[1].load.store(
            &LoadSample {
                waiting: 4,
                ..LoadSample::default()
            },
            first.clock.now_ms(),
        );
        // 10.0.0.1 leaves, 10.0.0.4 comes, 10.0.0.2 moves to index 0.
        let next = first.successor(&parse("{a: [10.0.0.2, 10.0.0.4], b: [10.0.0.3]}"));
        assert_eq!(next.generation, 1);
        let moved = &next.endpoints[0];
        assert_eq!(moved.addr_text, "10.0.0.2:80");
        assert_eq!(moved.in_flight.load(Ordering::Relaxed), 1);
        assert_eq!(
            moved
                .load
                .fresh(next.clock.now_ms(), 10_000)
                .map(|l| l.waiting),
            Some(4)
        );
        assert_eq!(next.endpoints[1].in_flight.load(Ordering::Relaxed), 0);
        assert!(
            next.endpoints[1]
                .load
                .fresh(next.clock.now_ms(), 10_000)
                .is_none()
        );
        assert_eq!(next.clusters[1].health(), ClusterHealth::Down);
        // The request picked before the reload releases the count the new generation reads.
        drop(held);
        assert_eq!(moved.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(moved.awaiting_first_token.load(Ordering::Relaxed), 0);

        // An endpoint that leaves with a request in flight and comes back before it ends takes
        // up its count again; once its requests end, it is forgotten.
        let held = InFlight::new(next.endpoints[1].clone());
        let without = next.successor(&parse("{a: [10.0.0.2], b: [10.0.0.3]}"));
        drop(next);
        let back = without.successor(&parse("{a: [10.0.0.2, 10.0.0.4], b: [10.0.0.3]}"));
        assert_eq!(back.endpoints[1].in_flight.load(Ordering::Relaxed), 1);
        drop(held);
        assert_eq!(back.endpoints[1].in_flight.load(Ordering::Relaxed), 0);
        // Gone for good: remembered while a generation or a request holds it, pruned after.
        let gone = back.successor(&parse("{a: [10.0.0.2], b: [10.0.0.3]}"));
        drop((first, without, back));
        let later = gone.successor(&parse("{a: [10.0.0.2], b: [10.0.0.3]}"));
        assert!(later.departed.is_empty(), "{:?}", later.departed.keys());
    }

    #[test]
    fn in_flight_guard_releases_once() {
        let cfg = fleetpick_config::FleetConfig::parse(
            "clusters: [{name: a}]\npools: [{name: p, models: [m], target_port: 80, endpoints: {a: [127.0.0.1]}}]\n",
            "t",
        )
        .unwrap();
        let fleet = Fleet::new(&cfg);
        let ep = fleet.endpoints[0].clone();
        let mut g1 = InFlight::new(ep.clone());
        let g2 = InFlight::new(ep.clone());
        assert_eq!(ep.in_flight.load(Ordering::Relaxed), 2);
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 2);
        g1.first_token();
        g1.first_token();
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 1);
        drop(g1);
        drop(g2);
        assert_eq!(ep.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 0);
        assert_eq!(fleet.pool_for("m"), Some(0));
        assert_eq!(fleet.pools[0].endpoints, vec![0]);
    }
}
