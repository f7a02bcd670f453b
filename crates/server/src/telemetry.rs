//! fleetpick's own Prometheus metrics: what it decided (picks per pool, cluster and tier; the
//! verdicts of dry-run policies; refusals) and what it sees (each cluster's health, each
//! endpoint's requests in flight), served as text on `/metrics` when a metrics listener is set,
//! beside `/healthz` (the process answers) and `/readyz` (it has an eligible endpoint and is
//! not shutting down).
//!
//! Most series on the request and response paths (picks, dry-run verdicts, admission outcomes,
//! time to first token, per-token time, queue waits, and the GIE request and running counts of
//! served models) are made once per generation of the fleet (at start and on each reload) for
//! every (pool, cluster, label) and found by index, so counting one is an atomic add: no label
//! strings built, no lock. A request of an older generation counts by name. Three are still
//! counted by label set, building their label strings and taking the family's lock per request:
//! request totals (`fleetpick_requests_total`), refusals (`fleetpick_refusals_total`) and GIE
//! errors (`inference_objective_request_error_total`). A reload keeps every counter's value
//! (the same labels find the same series) and drops the gauges of what left the fleet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use fleetpick_core::fleet::{ClusterHealth, Fleet, FleetCell};
use fleetpick_core::schedule::{Tier, Verdict};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PickLabels {
    pool: String,
    cluster: String,
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    pool: String,
    cluster: String,
    verdict: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    objective: String,
    cluster: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
    region: String,
    health: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    pool: String,
    priority: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BandLabels {
    pool: String,
    priority: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolClusterLabels {
    pool: String,
    cluster: String,
}

/// What became of a request at admission and in flow control's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowOutcome {
    /// Sent to an endpoint without waiting.
    Admitted,
    /// Sheddable, while its pool was saturated: 429.
    Shed,
    /// Held in the queue.
    Queued,
    /// Let go from the queue to an endpoint.
    Released,
    /// Waited past its time to live: 503.
    Expired,
    /// Its band was full: 429.
    Full,
    /// Its client left while it waited.
    Cancelled,
}

impl FlowOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowOutcome::Admitted => "admitted",
            FlowOutcome::Shed => "shed",
            FlowOutcome::Queued => "queued",
            FlowOutcome::Released => "released",
            FlowOutcome::Expired => "expired",
            FlowOutcome::Full => "full",
            FlowOutcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    pool: String,
    cluster: String,
    endpoint: String,
}

const OUTCOMES: [FlowOutcome; 7] = [
    FlowOutcome::Admitted,
    FlowOutcome::Shed,
    FlowOutcome::Queued,
    FlowOutcome::Released,
    FlowOutcome::Expired,
    FlowOutcome::Full,
    FlowOutcome::Cancelled,
];
const TIERS: [Tier; 4] = [Tier::Local, Tier::Spill, Tier::Saturated, Tier::LastResort];
const VERDICTS: [Verdict; 5] = [
    Verdict::Allow,
    Verdict::Drained,
    Verdict::AtCapacity,
    Verdict::NotPreferred,
    Verdict::Reject,
];
const HEALTHS: [ClusterHealth; 4] = [
    ClusterHealth::Starting,
    ClusterHealth::Up,
    ClusterHealth::Down,
    ClusterHealth::Recovering,
];

/// The registry and the handles the request path counts with.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The handles made for the current generation of the fleet.
    layout: arc_swap::ArcSwap<Layout>,
    picks: Family<PickLabels, Counter>,
    verdicts: Family<VerdictLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    health: Family<ClusterLabels, Gauge>,
    in_flight: Family<EndpointLabels, Gauge>,
    flow: Family<FlowLabels, Counter>,
    waits: Family<PoolLabels, Histogram>,
    queued: Family<BandLabels, Gauge>,
    /// Held by a render and by a change of generation, so that a render never writes the
    /// gauges of a generation that was just replaced (they would linger); it guards the queue
    /// bands seen so far, whose series stay (at 0) while they are empty.
    exposition: parking_lot::Mutex<Vec<BandLabels>>,
    free_slots: Family<PoolLabels, Gauge>,
    cluster_free_slots: Family<PoolClusterLabels, Gauge>,
    gie: GieMetrics,
    ttft: Family<PoolLabels, Histogram>,
    tpot: Family<PoolLabels, Histogram>,
    scrape_failures: Family<EndpointLabels, Gauge>,
    data_age: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    cluster_ready: Family<PoolClusterLabels, Gauge>,
}

/// The request path's handles for one generation of the fleet, found by index.
#[derive(Debug, Default)]
struct Layout {
    /// The fleet generation they were made for (`None`: none yet).
    generation: Option<u64>,
    clusters: usize,
    /// By `(pool * clusters + cluster) * TIERS.len() + tier`.
    picks: Vec<Counter>,
    /// By `(pool * clusters + cluster) * VERDICTS.len() + verdict`.
    verdicts: Vec<Counter>,
    /// The request and running series of every (model, target) a picked request can have:
    /// counting a request is a map lookup by `&str` and atomic adds, no label strings built.
    by_model: HashMap<String, HashMap<String, (Counter, Gauge)>>,
    /// By pool index.
    pools: Vec<PoolSeries>,
}

/// One pool's series on the request and response paths.
#[derive(Debug)]
struct PoolSeries {
    ttft: Histogram,
    tpot: Histogram,
    /// When the pool has flow control (present, empty, before the first wait).
    wait: Option<Histogram>,
    /// Admission and queue outcomes per priority the pool's requests can have (0 and its
    /// objectives'), in [`OUTCOMES`] order.
    flow: Vec<(i32, Vec<Counter>)>,
}

/// Labels of the Gateway API Inference Extension's request metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model_name: String,
    target_model_name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelErrorLabels {
    model_name: String,
    target_model_name: String,
    error_code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

/// The metrics named as the Gateway API Inference Extension's endpoint picker names them, so
/// that dashboards made for it work (no `fleetpick_` prefix).
#[derive(Debug)]
struct GieMetrics {
    requests: Family<ModelLabels, Counter>,
    errors: Family<ModelErrorLabels, Counter>,
    running: Family<ModelLabels, Gauge>,
    pool_kv: Family<NameLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pool_queue: Family<NameLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pool_ready: Family<NameLabels, Gauge>,
    scheduler: Histogram,
}

fn seconds_histogram(start: f64) -> Histogram {
    Histogram::new(exponential_buckets(start, 2.0, 16))
}

impl GieMetrics {
    fn register(root: &mut Registry) -> GieMetrics {
        let g = GieMetrics {
            requests: Family::default(),
            errors: Family::default(),
            running: Family::default(),
            pool_kv: Family::default(),
            pool_queue: Family::default(),
            pool_ready: Family::default(),
            // 10 µs to about 0.3 s.
            scheduler: seconds_histogram(0.000_01),
        };
        root.register(
            "inference_objective_request",
            "Requests picked for, by the model the client named and the model served",
            g.requests.clone(),
        );
        root.register(
            "inference_objective_request_error",
            "Requests that failed, by model, target model and error code (fleetpick's refusal reason, or the upstream status)",
            g.errors.clone(),
        );
        root.register(
            "inference_objective_running_requests",
            "Requests this picker has in flight, by model",
            g.running.clone(),
        );
        root.register(
            "inference_pool_average_kv_cache_utilization",
            "Average KV-cache use of the pool's endpoints with fresh metrics",
            g.pool_kv.clone(),
        );
        root.register(
            "inference_pool_average_queue_size",
            "Average number of requests waiting at the pool's endpoints with fresh metrics",
            g.pool_queue.clone(),
        );
        root.register(
            "inference_pool_ready_pods",
            "The pool's endpoints with fresh metrics",
            g.pool_ready.clone(),
        );
        root.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to pick an endpoint for one request",
            g.scheduler.clone(),
        );
        g
    }
}

impl Metrics {
    pub fn new(fleet: &Fleet) -> Metrics {
        let mut root = Registry::default();
        let gie = GieMetrics::register(&mut root);
        let ttft = Family::<PoolLabels, Histogram>::new_with_constructor(
            ttft_histogram as fn() -> Histogram,
        );
        let tpot = Family::<PoolLabels, Histogram>::new_with_constructor(
            tpot_histogram as fn() -> Histogram,
        );
        let registry = root.sub_registry_with_prefix("fleetpick");
        registry.register(
            "time_per_output_token_seconds",
            "Streamed responses: from the first byte to the end, over the events after the first, by pool",
            tpot.clone(),
        );
        let scrape_failures = Family::<EndpointLabels, Gauge>::default();
        let data_age =
            Family::<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let cluster_ready = Family::<PoolClusterLabels, Gauge>::default();
        registry.register(
            "endpoint_scrape_failures",
            "Consecutive failed scrapes of each endpoint's /metrics (0 while they succeed)",
            scrape_failures.clone(),
        );
        registry.register(
            "endpoint_data_age_seconds",
            "Age of each endpoint's last good scrape (past the poller's stale_after_ms it is not eligible; -1: never scraped)",
            data_age.clone(),
        );
        registry.register(
            "cluster_ready_endpoints",
            "Endpoints with fresh metrics, per pool and cluster",
            cluster_ready.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From the pick to the first byte of the response body, by pool (Envoy's and the model server's time)",
            ttft.clone(),
        );
        let picks_family = Family::<PickLabels, Counter>::default();
        let verdict_family = Family::<VerdictLabels, Counter>::default();
        let refusals = Family::<ReasonLabels, Counter>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests ended, by the model the client named, objective, the cluster that served (empty: fleetpick answered) and HTTP status (0: the client left first)",
            requests.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        let health = Family::<ClusterLabels, Gauge>::default();
        let in_flight = Family::<EndpointLabels, Gauge>::default();
        let flow = Family::<FlowLabels, Counter>::default();
        let waits = Family::<PoolLabels, Histogram>::new_with_constructor(
            wait_histogram as fn() -> Histogram,
        );
        let queued = Family::<BandLabels, Gauge>::default();
        let free_slots = Family::<PoolLabels, Gauge>::default();
        let cluster_free_slots = Family::<PoolClusterLabels, Gauge>::default();
        registry.register(
            "cluster_free_slots",
            "The saturation detector per pool and cluster: requests the cluster's endpoints of the pool take before none has headroom",
            cluster_free_slots.clone(),
        );
        registry.register(
            "flow_requests",
            "Admission and flow control, by pool, priority and outcome (admitted, shed, queued, released, expired, full, cancelled)",
            flow.clone(),
        );
        registry.register(
            "flow_wait_seconds",
            "Time requests waited in flow control's queue before release, by pool",
            waits.clone(),
        );
        registry.register(
            "flow_queue_length",
            "Requests waiting in flow control's queue, by pool and priority band",
            queued.clone(),
        );
        registry.register(
            "pool_free_slots",
            "The saturation detector: requests each pool takes before no endpoint has headroom (0: saturated)",
            free_slots.clone(),
        );
        registry.register(
            "picks",
            "Requests sent to an endpoint, by pool, the endpoint's cluster, and the tier it was picked from (local, spill, saturated, last-resort)",
            picks_family.clone(),
        );
        registry.register(
            "dry_run_verdicts",
            "What a dry-run backend policy would have done with each pick, by pool and the picked endpoint's cluster",
            verdict_family.clone(),
        );
        registry.register(
            "refusals",
            "Requests answered by fleetpick itself, by reason",
            refusals.clone(),
        );
        registry.register(
            "config_reloads",
            "Changed fleet files read, by result (applied, or refused: unparsable, or another fleet)",
            reloads.clone(),
        );
        registry.register(
            "cluster_health",
            "1 for each cluster's current health (starting, up, down, recovering)",
            health.clone(),
        );
        registry.register(
            "endpoint_in_flight",
            "Requests this picker has in flight at each endpoint",
            in_flight.clone(),
        );
        let m = Metrics {
            registry: root,
            layout: arc_swap::ArcSwap::from_pointee(Layout::default()),
            picks: picks_family,
            verdicts: verdict_family,
            gie,
            ttft,
            tpot,
            scrape_failures,
            data_age,
            cluster_ready,
            refusals,
            requests,
            reloads,
            health,
            in_flight,
            flow,
            waits,
            queued,
            exposition: parking_lot::Mutex::new(Vec::new()),
            free_slots,
            cluster_free_slots,
        };
        m.adopt(fleet);
        m
    }

    /// Makes the request path's handles for `fleet` (a new generation) and drops the gauges of
    /// the generation before (rendered afresh from the fleet at each scrape, so a pool, cluster
    /// or endpoint that left does not linger). Counters keep their values.
    pub fn adopt(&self, fleet: &Fleet) {
        let mut bands = self.exposition.lock();
        self.adopt_unlocked(fleet, &mut bands);
    }

    /// Makes `next` the current generation in `cell` and adopts it, as one step for renders.
    pub fn switch(&self, cell: &FleetCell, next: Arc<Fleet>) {
        let mut bands = self.exposition.lock();
        self.adopt_unlocked(&next, &mut bands);
        cell.store(next);
    }

    fn adopt_unlocked(&self, fleet: &Fleet, bands_seen: &mut Vec<BandLabels>) {
        let gauges_of_the_fleet = [
            &self.in_flight as &dyn Clear,
            &self.scrape_failures,
            &self.data_age,
            &self.cluster_ready,
            &self.health,
            &self.gie.pool_kv,
            &self.gie.pool_queue,
            &self.gie.pool_ready,
            &self.free_slots,
            &self.cluster_free_slots,
            &self.queued,
        ];
        for g in gauges_of_the_fleet {
            g.clear_all();
        }
        // The bands a queue may have, present (at 0) from the start: priority 0 and the
        // priorities of the pool's objectives.
        let mut bands = Vec::new();
        for (p, pool) in fleet.pools.iter().enumerate() {
            if pool.queue.is_none() {
                continue;
            }
            let mut priorities: Vec<i32> = fleet
                .objectives
                .values()
                .filter(|o| o.pool == p && o.priority >= 0)
                .map(|o| o.priority)
                .chain([0])
                .collect();
            priorities.sort_unstable();
            priorities.dedup();
            for priority in priorities {
                let labels = BandLabels {
                    pool: pool.name.clone(),
                    priority: priority.to_string(),
                };
                self.queued.get_or_create(&labels).set(0);
                bands.push(labels);
            }
        }
        *bands_seen = bands;
        let mut layout = Layout {
            generation: Some(fleet.generation),
            clusters: fleet.clusters.len(),
            ..Layout::default()
        };
        for pool in &fleet.pools {
            for cluster in &fleet.clusters {
                for t in TIERS {
                    layout
                        .picks
                        .push(self.picks.get_or_create_owned(&PickLabels {
                            pool: pool.name.clone(),
                            cluster: cluster.name.clone(),
                            tier: t.as_str().into(),
                        }));
                }
                for v in VERDICTS {
                    layout
                        .verdicts
                        .push(self.verdicts.get_or_create_owned(&VerdictLabels {
                            pool: pool.name.clone(),
                            cluster: cluster.name.clone(),
                            verdict: v.as_str().into(),
                        }));
                }
            }
        }
        let pairs: Vec<(&str, &str)> = fleet
            .served_models()
            .map(|m| (m, m))
            .chain(fleet.rewrites.pairs())
            .collect();
        for (model, target) in pairs {
            let handles = self.model_series(model, target);
            layout
                .by_model
                .entry(model.to_string())
                .or_default()
                .insert(target.to_string(), handles);
        }
        for (p, pool) in fleet.pools.iter().enumerate() {
            let labels = PoolLabels {
                pool: pool.name.clone(),
            };
            let mut priorities: Vec<i32> = fleet
                .objectives
                .values()
                .filter(|o| o.pool == p)
                .map(|o| o.priority)
                .chain([0])
                .collect();
            priorities.sort_unstable();
            priorities.dedup();
            let flow = priorities
                .into_iter()
                .map(|priority| {
                    let counters = OUTCOMES
                        .iter()
                        .map(|o| {
                            self.flow.get_or_create_owned(&FlowLabels {
                                pool: pool.name.clone(),
                                priority: priority.to_string(),
                                outcome: o.as_str().into(),
                            })
                        })
                        .collect();
                    (priority, counters)
                })
                .collect();
            layout.pools.push(PoolSeries {
                ttft: self.ttft.get_or_create_owned(&labels),
                tpot: self.tpot.get_or_create_owned(&labels),
                wait: pool
                    .queue
                    .is_some()
                    .then(|| self.waits.get_or_create_owned(&labels)),
                flow,
            });
        }
        self.layout.store(Arc::new(layout));
    }

    /// The request and running series of (`model`, `target`), made now.
    fn model_series(&self, model: &str, target: &str) -> (Counter, Gauge) {
        let labels = ModelLabels {
            model_name: model.to_string(),
            target_model_name: target.to_string(),
        };
        (
            self.gie.requests.get_or_create_owned(&labels),
            self.gie.running.get_or_create_owned(&labels),
        )
    }

    /// The series of a picked request: made with the layout (see [`Layout::by_model`]), or now
    /// for a pair nobody foresaw.
    fn handles(&self, model: &str, target: &str) -> (Counter, Gauge) {
        let layout = self.layout.load();
        match layout.by_model.get(model).and_then(|t| t.get(target)) {
            Some(h) => h.clone(),
            None => self.model_series(model, target),
        }
    }

    /// Counts what admission or the queue did with a request of `priority` in `pool`.
    /// (`pool`: an index in `fleet`, the request's generation.)
    pub fn flow(&self, fleet: &Fleet, pool: usize, priority: i32, outcome: FlowOutcome) {
        let at = OUTCOMES.iter().position(|&o| o == outcome);
        let counted = self.with_pool(fleet, pool, |s| {
            let (_, counters) = s.flow.iter().find(|(p, _)| *p == priority)?;
            counters.get(at?)?.inc();
            Some(())
        });
        if counted.flatten().is_none() {
            self.flow
                .get_or_create(&FlowLabels {
                    pool: fleet.pool_name(Some(pool)).to_string(),
                    priority: priority.to_string(),
                    outcome: outcome.as_str().into(),
                })
                .inc();
        }
    }

    /// Records how long a released request of `pool` waited.
    pub fn waited(&self, fleet: &Fleet, pool: usize, wait: std::time::Duration) {
        self.observe(fleet, pool, |s| s.wait.as_ref(), &self.waits, wait);
    }

    /// The layout of `fleet`'s generation, if it is the current one: the request path's handles
    /// are found by index there. `None`: a request of the generation before a reload, whose
    /// series are found by name instead.
    fn layout_of(&self, fleet: &Fleet) -> Option<arc_swap::Guard<Arc<Layout>>> {
        let layout = self.layout.load();
        (layout.generation == Some(fleet.generation)).then_some(layout)
    }

    fn with_pool<R>(
        &self,
        fleet: &Fleet,
        pool: usize,
        f: impl FnOnce(&PoolSeries) -> R,
    ) -> Option<R> {
        self.layout_of(fleet)?.pools.get(pool).map(f)
    }

    /// Observes `value` in `pool`'s histogram of `family` (`pick` names it in the layout).
    fn observe(
        &self,
        fleet: &Fleet,
        pool: usize,
        pick: fn(&PoolSeries) -> Option<&Histogram>,
        family: &Family<PoolLabels, Histogram>,
        value: std::time::Duration,
    ) {
        let v = value.as_secs_f64();
        let observed = self.with_pool(fleet, pool, |s| pick(s).map(|h| h.observe(v)));
        if observed.flatten().is_none() {
            family
                .get_or_create(&PoolLabels {
                    pool: fleet.pool_name(Some(pool)).to_string(),
                })
                .observe(v);
        }
    }

    /// Counts a pick of an endpoint of `pool` in `cluster` (indices in `fleet`, the generation
    /// the request was picked in).
    pub fn picked(
        &self,
        fleet: &Fleet,
        pool: usize,
        cluster: usize,
        tier: Tier,
        verdict: Option<Verdict>,
    ) {
        let Some(layout) = self.layout_of(fleet) else {
            // Picked in the generation before a reload, counted after it: by name.
            let (pool, cluster) = (fleet.pool_name(Some(pool)), &fleet.clusters[cluster].name);
            self.picks
                .get_or_create(&PickLabels {
                    pool: pool.to_string(),
                    cluster: cluster.clone(),
                    tier: tier.as_str().into(),
                })
                .inc();
            if let Some(v) = verdict {
                self.verdicts
                    .get_or_create(&VerdictLabels {
                        pool: pool.to_string(),
                        cluster: cluster.clone(),
                        verdict: v.as_str().into(),
                    })
                    .inc();
            }
            return;
        };
        let at = pool * layout.clusters + cluster;
        if let Some(t) = TIERS.iter().position(|&x| x == tier)
            && let Some(c) = layout.picks.get(at * TIERS.len() + t)
        {
            c.inc();
        }
        if let Some(v) = verdict
            && let Some(i) = VERDICTS.iter().position(|&x| x == v)
            && let Some(c) = layout.verdicts.get(at * VERDICTS.len() + i)
        {
            c.inc();
        }
    }

    /// Counts a request that ended: served in `cluster` ("" when fleetpick answered it) with
    /// `status` (0 when it ended without an answer).
    pub fn request_done(&self, model: &str, objective: &str, cluster: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                objective: objective.to_string(),
                cluster: cluster.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts a request fleetpick answered itself.
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A request picked for: `model` as the client named it, `target` as it is served.
    pub fn request_started(&self, model: &str, target: &str, pick_time: std::time::Duration) {
        let (requests, running) = self.handles(model, target);
        requests.inc();
        running.inc();
        self.gie.scheduler.observe(pick_time.as_secs_f64());
    }

    /// The end of a request counted by [`Metrics::request_started`].
    pub fn request_ended(&self, model: &str, target: &str) {
        self.handles(model, target).1.dec();
    }

    /// A request that failed: refused by fleetpick (`code` its reason) or answered with an
    /// error status upstream (`code` the status).
    pub fn request_failed(&self, model: &str, target: &str, code: &str) {
        self.gie
            .errors
            .get_or_create(&ModelErrorLabels {
                model_name: model.to_string(),
                target_model_name: target.to_string(),
                error_code: code.to_string(),
            })
            .inc();
    }

    /// The first byte of a response body, `since` the pick, for `pool`.
    pub fn first_token(&self, fleet: &Fleet, pool: usize, since: std::time::Duration) {
        self.observe(fleet, pool, |s| Some(&s.ttft), &self.ttft, since);
    }

    /// A streamed response's mean time between output tokens, for `pool`.
    pub fn time_per_output_token(
        &self,
        fleet: &Fleet,
        pool: usize,
        per_token: std::time::Duration,
    ) {
        self.observe(fleet, pool, |s| Some(&s.tpot), &self.tpot, per_token);
    }

    /// Counts a changed fleet file, applied or refused.
    pub fn reloaded(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition, with the gauges read from `fleet` now.
    pub fn render(&self, fleet: &Fleet) -> Result<String, std::fmt::Error> {
        let mut bands = self.exposition.lock();
        self.render_unlocked(fleet, &mut bands)
    }

    /// The text exposition of the current generation in `cell`.
    pub fn render_current(&self, cell: &FleetCell) -> Result<String, std::fmt::Error> {
        let mut bands = self.exposition.lock();
        self.render_unlocked(&cell.load(), &mut bands)
    }

    fn render_unlocked(
        &self,
        fleet: &Fleet,
        seen: &mut Vec<BandLabels>,
    ) -> Result<String, std::fmt::Error> {
        for c in &fleet.clusters {
            let now = c.health();
            for h in HEALTHS {
                self.health
                    .get_or_create(&ClusterLabels {
                        cluster: c.name.clone(),
                        region: c.region.clone(),
                        health: h.as_str().into(),
                    })
                    .set(i64::from(h == now));
            }
        }
        let now = fleet.clock.now_ms();
        let mut ready = vec![0i64; fleet.pools.len() * fleet.clusters.len()];
        for e in &fleet.endpoints {
            let labels = EndpointLabels {
                pool: fleet.pools[e.pool].name.clone(),
                cluster: fleet.clusters[e.cluster].name.clone(),
                endpoint: e.addr_text.clone(),
            };
            self.in_flight
                .get_or_create(&labels)
                .set(i64::from(e.in_flight.load(Ordering::Relaxed)));
            self.scrape_failures
                .get_or_create(&labels)
                .set(i64::from(e.load.failures()));
            self.data_age
                .get_or_create(&labels)
                .set(e.load.age_ms(now).map_or(-1.0, |ms| ms as f64 / 1000.0));
            if e.load.fresh(now, fleet.poller.stale_after_ms).is_some() {
                ready[e.pool * fleet.clusters.len() + e.cluster] += 1;
            }
        }
        for (p, pool) in fleet.pools.iter().enumerate() {
            for (c, cluster) in fleet.clusters.iter().enumerate() {
                if pool
                    .endpoints
                    .iter()
                    .any(|&e| fleet.endpoints[e].cluster == c)
                {
                    self.cluster_ready
                        .get_or_create(&PoolClusterLabels {
                            pool: pool.name.clone(),
                            cluster: cluster.name.clone(),
                        })
                        .set(ready[p * fleet.clusters.len() + c]);
                }
            }
        }
        for pool in &fleet.pools {
            let fresh: Vec<fleetpick_core::fleet::Load> = pool
                .endpoints
                .iter()
                .filter_map(|&e| {
                    fleet.endpoints[e]
                        .load
                        .fresh(now, fleet.poller.stale_after_ms)
                })
                .collect();
            let n = fresh.len().max(1) as f64;
            let labels = NameLabels {
                name: pool.name.clone(),
            };
            self.gie
                .pool_ready
                .get_or_create(&labels)
                .set(fresh.len() as i64);
            self.gie
                .pool_kv
                .get_or_create(&labels)
                .set(fresh.iter().map(|l| l.kv_usage).sum::<f64>() / n);
            self.gie
                .pool_queue
                .get_or_create(&labels)
                .set(fresh.iter().map(|l| f64::from(l.waiting)).sum::<f64>() / n);
        }
        for (p, pool) in fleet.pools.iter().enumerate() {
            let per_cluster = fleetpick_core::schedule::free_slots_per_cluster(fleet, p);
            for (c, free) in per_cluster.iter().enumerate() {
                if fleet.pools[p]
                    .endpoints
                    .iter()
                    .any(|&e| fleet.endpoints[e].cluster == c)
                {
                    self.cluster_free_slots
                        .get_or_create(&PoolClusterLabels {
                            pool: pool.name.clone(),
                            cluster: fleet.clusters[c].name.clone(),
                        })
                        .set(i64::from(*free));
                }
            }
            self.free_slots
                .get_or_create(&PoolLabels {
                    pool: pool.name.clone(),
                })
                .set(i64::from(
                    per_cluster.iter().fold(0u32, |a, b| a.saturating_add(*b)),
                ));
            if let Some(q) = &pool.queue {
                // Bands that emptied read 0 (their series stay: a queue's bands come back).
                for labels in seen.iter().filter(|l| l.pool == pool.name) {
                    self.queued.get_or_create(labels).set(0);
                }
                for (priority, n) in q.lengths() {
                    let labels = BandLabels {
                        pool: pool.name.clone(),
                        priority: priority.to_string(),
                    };
                    self.queued.get_or_create(&labels).set(n as i64);
                    if !seen.contains(&labels) {
                        seen.push(labels);
                    }
                }
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A family whose series can all be dropped, whatever its labels and metric.
trait Clear {
    fn clear_all(&self);
}

impl<S, M, C> Clear for Family<S, M, C>
where
    S: Clone + std::hash::Hash + Eq,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    fn clear_all(&self) {
        self.clear();
    }
}

fn tpot_histogram() -> Histogram {
    // 0.1 ms to about 3 s.
    seconds_histogram(0.000_1)
}

fn ttft_histogram() -> Histogram {
    // 1 ms to about 33 s.
    seconds_histogram(0.001)
}

fn wait_histogram() -> Histogram {
    ttft_histogram()
}

/// Serves `GET /metrics` on `listener` (until the task running it is dropped or aborted).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    fleet: Arc<FleetCell>,
    health: crate::health::Health,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new()
        // Liveness: the process answers.
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        // Readiness: some endpoint is eligible and fleetpick is not shutting down (the same
        // rule as gRPC health).
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = health.serving();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, fleet) = (metrics.clone(), fleet.clone());
                async move {
                    match metrics.render_current(&fleet) {
                        Ok(text) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain")],
                            "cannot encode the metrics\n".to_string(),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpick_config::FleetConfig;

    #[test]
    fn request_path_series_count_by_index_and_by_name_across_a_reload() {
        let cfg = FleetConfig::parse(
            "clusters: [{name: a}]\npools:\n  - {name: p, models: [m], target_port: 80, endpoints: {a: [10.0.0.1]}}\n  - {name: q, models: [n], target_port: 80, endpoints: {a: [10.0.0.2]}}\n",
            "t",
        )
        .unwrap();
        let old = Fleet::new(&cfg);
        let m = Metrics::new(&old);
        m.flow(&old, 1, 0, FlowOutcome::Admitted);
        m.first_token(&old, 1, std::time::Duration::from_millis(10));
        // The next generation lists the pools the other way round: a request of the old one
        // still counts under its own pool's name.
        let swapped = FleetConfig::parse(
            "clusters: [{name: a}]\npools:\n  - {name: q, models: [n], target_port: 80, endpoints: {a: [10.0.0.2]}}\n  - {name: p, models: [m], target_port: 80, endpoints: {a: [10.0.0.1]}}\n",
            "t",
        )
        .unwrap();
        let new = old.successor(&swapped);
        m.adopt(&new);
        m.flow(&old, 1, 0, FlowOutcome::Admitted);
        m.flow(&new, 0, 0, FlowOutcome::Admitted);
        m.first_token(&new, 0, std::time::Duration::from_millis(10));
        let text = m.render(&new).unwrap();
        assert!(
            text.contains(
                "fleetpick_flow_requests_total{pool=\"q\",priority=\"0\",outcome=\"admitted\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetpick_flow_requests_total{pool=\"p\",priority=\"0\",outcome=\"admitted\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("fleetpick_time_to_first_token_seconds_count{pool=\"q\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn picks_and_verdicts_count_under_their_labels() {
        let cfg = FleetConfig::parse(
            "clusters: [{name: a, region: r1}, {name: b, region: r2}]\npools:\n  - {name: p, models: [m], target_port: 80, endpoints: {a: [10.0.0.1], b: [10.0.0.2]}}\n",
            "t",
        )
        .unwrap();
        let fleet = Fleet::new(&cfg);
        let m = Metrics::new(&fleet);
        m.picked(&fleet, 0, 1, Tier::Spill, Some(Verdict::Drained));
        m.picked(&fleet, 0, 1, Tier::Spill, None);
        m.refused("at-capacity");
        let text = m.render(&fleet).unwrap();
        assert!(
            text.contains("fleetpick_picks_total{pool=\"p\",cluster=\"b\",tier=\"spill\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fleetpick_picks_total{pool=\"p\",cluster=\"a\",tier=\"local\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetpick_dry_run_verdicts_total{pool=\"p\",cluster=\"b\",verdict=\"drained\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("fleetpick_refusals_total{reason=\"at-capacity\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetpick_cluster_health{cluster=\"a\",region=\"r1\",health=\"starting\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetpick_endpoint_in_flight{pool=\"p\",cluster=\"a\",endpoint=\"10.0.0.1:80\"} 0"
            ),
            "{text}"
        );
    }
}
