//! The benchmark harness: runs a scenario (a simulated fleet, a workload, a sweep of offered
//! rates) through each routing strategy in one run, with the real Envoy in front every time,
//! and writes the results (JSON) and a report (Markdown).
//!
//! Strategies: Envoy alone with round robin (what a Kubernetes Service gives), Envoy alone with
//! least request, fleetpick with its default weights, and fleetpick variants the scenario names
//! (other weights, scorers switched off). Every (strategy, rate) cell gets a fresh simulated
//! fleet, so caches and queues never carry over from one cell to the next.
//!
//! Scenario file (YAML; see `bench/scenarios/`):
//! ```yaml
//! name: steady
//! fleet: {servers: 4, clusters: [local], time_scale: 10, engine: {max_num_seqs: 16}}
//! workload: {api: completions, prompt_bytes: 1024, max_tokens: 64, stream: true}
//! rates: [2, 4, 8]        # offered requests per second, Poisson arrivals
//! duration_s: 20          # per cell
//! warmup_s: 0             # load before each cell's measured time (not counted)
//! strategies: [round-robin, least-request, fleetpick, {name: no-queue, weights: {queue: 0}}]
//! ```

pub mod plot;
pub mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use fleetpick_config::{FleetConfig, Weights};
use fleetpick_envoy::{BodyMode, EnvoyParams, EnvoyProcess, Flavor, render};
use fleetpick_loadgen::{self as loadgen, Arrivals, LoadSpec, Percentiles, Workload, cpu};
use fleetpick_protocol::openai::{Api, InferenceRequest};
use fleetpick_sim::FleetOptions;
use fleetpick_sim::params::{EngineOverrides, SimConfig};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetShape {
    pub servers: usize,
    #[serde(default = "default_clusters")]
    pub clusters: Vec<String>,
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Engine parameters of every server (see the simulator's config file).
    #[serde(default, skip_serializing)]
    pub engine: EngineOverrides,
    /// Region of each cluster (default: all in one).
    #[serde(default)]
    pub regions: BTreeMap<String, String>,
    /// Simulated network delay to each cluster's servers, in (simulated) milliseconds.
    #[serde(default)]
    pub network_delay_ms: BTreeMap<String, f64>,
    /// The region fleetpick runs in, and the one Envoy's locality-aware baselines prefer.
    #[serde(default)]
    pub picker_region: Option<String>,
}

fn default_clusters() -> Vec<String> {
    vec!["local".to_string()]
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ApiKind {
    #[default]
    Completions,
    Chat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(default)]
    pub api: ApiKind,
    pub prompt_bytes: usize,
    #[serde(default)]
    pub shared_prefix_bytes: usize,
    #[serde(default = "one_usize")]
    pub prefix_groups: usize,
    #[serde(default)]
    pub long_share: f64,
    #[serde(default)]
    pub long_prompt_bytes: usize,
    pub max_tokens: u32,
    #[serde(default = "yes")]
    pub stream: bool,
}

fn one_usize() -> usize {
    1
}

fn yes() -> bool {
    true
}

impl WorkloadSpec {
    fn workload(&self, model: &str) -> Workload {
        Workload {
            api: match self.api {
                ApiKind::Completions => Api::Completions,
                ApiKind::Chat => Api::ChatCompletions,
            },
            model: model.to_string(),
            prompt_bytes: self.prompt_bytes,
            shared_prefix_bytes: self.shared_prefix_bytes,
            prefix_groups: self.prefix_groups,
            max_tokens: self.max_tokens,
            stream: self.stream,
            long_share: self.long_share,
            long_prompt_bytes: self.long_prompt_bytes,
            get_path: None,
            headers: Vec::new(),
        }
    }

    /// The share of prompt tokens a perfect prefix cache could serve, counted as the simulator
    /// counts them: the requests the load generator sends (256 of them, drawn as it draws
    /// them) through the simulator's chat template and tokenizer, and for each the whole
    /// blocks of `block_size` tokens it shares with another request. Warm caches: the first
    /// request of each group, a miss, is not counted as one.
    pub fn prefix_upper_bound(&self, model: &str, block_size: usize) -> f64 {
        if self.shared_prefix_bytes == 0 {
            return 0.0;
        }
        let workload = self.workload(model);
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let prompts: Vec<Vec<u32>> = (0..256)
            .filter_map(|i| {
                let (path, body, _) = workload.request(i, &mut rng);
                let req = InferenceRequest::parse(Api::from_path(path)?, &body).ok()?;
                fleetpick_sim::template::sequences(req.input)
                    .into_iter()
                    .next()
            })
            .collect();
        let total: usize = prompts.iter().map(Vec::len).sum();
        let block = block_size.max(1);
        let served: usize = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shared = prompts
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, q)| p.iter().zip(q).take_while(|(a, b)| a == b).count())
                    .max()
                    .unwrap_or(0);
                shared / block * block
            })
            .sum();
        if total == 0 {
            return 0.0;
        }
        served as f64 / total as f64
    }
}

/// A routing strategy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StrategySpec {
    /// `round-robin`, `least-request` or `fleetpick`.
    Named(String),
    /// A fleetpick variant with its own weights.
    Variant {
        name: String,
        #[serde(default)]
        /// Weights not named keep their defaults.
        weights: Weights,
        /// Flow control on (see [`fleetpick_config::FlowControlSettings`]).
        #[serde(default)]
        flow_control: bool,
        /// fleetpick's own `/metrics` scraped this often during each cell, as Prometheus
        /// would (to measure what the scrapes cost).
        #[serde(default)]
        scrape_metrics_ms: Option<u64>,
    },
}

/// A strategy resolved: which Envoy, and fleetpick's weights if it is in the path.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    pub name: String,
    pub flavor: Flavor,
    pub weights: Option<Weights>,
    /// Envoy balances by locality: the picker's region at priority 0, the others at 1.
    pub locality: bool,
    /// fleetpick holds requests while the pool is saturated.
    pub flow_control: bool,
    /// fleetpick's `/metrics` is scraped this often during each cell.
    pub scrape_metrics_ms: Option<u64>,
}

impl StrategySpec {
    fn resolve(&self) -> Result<Strategy, BenchError> {
        match self {
            StrategySpec::Named(n) => {
                let (flavor, weights, locality) = match n.as_str() {
                    "round-robin" => (Flavor::RoundRobin, None, false),
                    "least-request" => (Flavor::LeastRequest, None, false),
                    "locality-round-robin" => (Flavor::RoundRobin, None, true),
                    "locality-least-request" => (Flavor::LeastRequest, None, true),
                    "fleetpick" => (Flavor::OriginalDst, Some(Weights::default()), false),
                    other => {
                        return Err(BenchError::Scenario(format!(
                            "strategies: unknown strategy `{other}` (round-robin, least-request, locality-round-robin, locality-least-request, fleetpick, or {{name, weights}})"
                        )));
                    }
                };
                Ok(Strategy {
                    name: n.clone(),
                    flavor,
                    weights,
                    locality,
                    flow_control: false,
                    scrape_metrics_ms: None,
                })
            }
            StrategySpec::Variant {
                name,
                weights,
                flow_control,
                scrape_metrics_ms,
            } => {
                if *scrape_metrics_ms == Some(0) {
                    return Err(BenchError::Scenario(format!(
                        "strategies: {name}: scrape_metrics_ms must be above 0"
                    )));
                }
                Ok(Strategy {
                    name: name.clone(),
                    flavor: Flavor::OriginalDst,
                    weights: Some(*weights),
                    locality: false,
                    flow_control: *flow_control,
                    scrape_metrics_ms: *scrape_metrics_ms,
                })
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub fleet: FleetShape,
    pub workload: WorkloadSpec,
    pub rates: Vec<f64>,
    pub duration_s: f64,
    pub strategies: Vec<StrategySpec>,
    /// Bursts on top of each rate (default: steady Poisson arrivals at the rate).
    #[serde(default)]
    pub bursts: Option<BurstSpec>,
    /// Which client sends the load: fleetpick's own (`rust`, the default) or `inference-perf`
    /// (bench/inference-perf/, run offline; no bursts, no mixed prompt lengths).
    #[serde(default)]
    pub load_generator: LoadGenerator,
    #[serde(default)]
    pub seed: u64,
    /// After the rates, one closed-loop cell per strategy: the highest request rate each path
    /// sustains (the overhead scenario's second question).
    #[serde(default)]
    pub max_rate: Option<MaxRateSpec>,
    /// Faults during each cell: a cluster stopped or started `at_s` seconds in.
    #[serde(default)]
    pub events: Vec<EventSpec>,
    /// Parts of each cell reported on their own (requests by start time), such as "during the
    /// burst" or "while a cluster is lost".
    #[serde(default)]
    pub windows: Vec<WindowSpec>,
    /// Seconds of load before each cell's measured `duration_s`: requests started then are not
    /// counted, nor the prefix-cache hits and queries of that time. Caches that start cold
    /// (each prefix group's first request must miss) are measured warm, as a fleet that has
    /// been serving for hours is. Times of events and windows still count from the start.
    #[serde(default)]
    pub warmup_s: f64,
    /// Workload classes sent together in each cell, each a share of the offered rate and with
    /// its own objective; reported apart. Empty: one class, the workload.
    #[serde(default)]
    pub classes: Vec<ClassSpec>,
    /// InferenceObjectives given to fleetpick (on the scenario's pool), for classes to name.
    #[serde(default)]
    pub objectives: Vec<BenchObjective>,
    /// The backend policy fleetpick strategies import the pool with (the fleet file's
    /// `imports[].policy`, checked by it; default: the default policy). Its thresholds are the
    /// saturation detector's.
    #[serde(default)]
    pub policy: Option<serde_json::Value>,
}

/// A workload class: the scenario's workload with its own share of the rate, objective and
/// sizes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    pub name: String,
    /// Share of each cell's offered rate.
    pub share: f64,
    /// Sent as `x-gateway-inference-objective`.
    #[serde(default)]
    pub objective: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub prompt_bytes: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BenchObjective {
    pub name: String,
    pub priority: i32,
}

/// A fault at a moment of each cell.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub at_s: f64,
    /// Stop every server of this cluster (connections refused, open ones dropped).
    #[serde(default)]
    pub stop: Option<String>,
    /// Start them again.
    #[serde(default)]
    pub start: Option<String>,
}

/// A named part of each cell, by request start time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
}

/// A closed-loop cell: `concurrency` clients, each sending its next request when the last ends.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaxRateSpec {
    pub concurrency: usize,
    pub duration_s: f64,
}

/// The load of one cell: Poisson arrivals at a rate (with the scenario's bursts, if any), or a
/// closed loop.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Rate(f64),
    Closed { concurrency: usize },
}

impl Load {
    fn duration_s(self, scenario: &Scenario) -> f64 {
        match (self, scenario.max_rate) {
            (Load::Closed { .. }, Some(m)) => m.duration_s,
            _ => scenario.duration_s,
        }
    }

    /// Seeds differ per cell, and are the same for every strategy in a cell.
    fn seed_bits(self) -> u64 {
        match self {
            Load::Rate(r) => r.to_bits(),
            Load::Closed { concurrency } => concurrency as u64,
        }
    }
}

/// The client that sends a scenario's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadGenerator {
    #[default]
    Rust,
    InferencePerf,
}

/// inference-perf counts lengths in tokens of its local tokenizer, about 6.6 bytes of its
/// generated text each (bench/inference-perf/README.md).
const INFERENCE_PERF_BYTES_PER_TOKEN: f64 = 6.6;

/// Bursts: for `on_s` seconds of every `on_s + off_s`, arrivals come `factor` times faster.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BurstSpec {
    pub factor: f64,
    pub on_s: f64,
    pub off_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path}: {source}")]
    Parse {
        path: String,
        source: serde_norway::Error,
    },
    #[error("scenario: {0}")]
    Scenario(String),
    #[error(transparent)]
    Sim(#[from] fleetpick_sim::SimError),
    #[error(transparent)]
    Config(#[from] fleetpick_config::ConfigError),
    #[error(transparent)]
    Envoy(#[from] fleetpick_envoy::EnvoyError),
    #[error(transparent)]
    Load(#[from] loadgen::LoadError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("fleetpick never saw every endpoint scraped")]
    NotReady,
    #[error("no request got through Envoy in 15 s")]
    NotRouting,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let s: Scenario = serde_norway::from_str(&text).map_err(|source| BenchError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Scenario(m.to_string()));
        if self.rates.is_empty() || self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return bad("rates: list one or more positive request rates");
        }
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return bad("duration_s: must be a positive number of seconds");
        }
        if !(self.warmup_s.is_finite() && self.warmup_s >= 0.0) {
            return bad("warmup_s: must be 0 or more seconds");
        }
        if self
            .classes
            .iter()
            .any(|c| !(c.share.is_finite() && c.share > 0.0))
        {
            return bad("classes: each share must be a positive number");
        }
        if !self.classes.is_empty() && self.load_generator == LoadGenerator::InferencePerf {
            return bad("classes: not with inference-perf");
        }
        for c in &self.classes {
            if let Some(o) = &c.objective
                && !self.objectives.iter().any(|x| &x.name == o)
            {
                return Err(BenchError::Scenario(format!(
                    "classes ({}): objective `{o}` is not among the scenario's objectives",
                    c.name
                )));
            }
        }
        if self.load_generator == LoadGenerator::InferencePerf && self.warmup_s > 0.0 {
            return bad("warmup_s: not with inference-perf (it reports every request it sent)");
        }
        if self.strategies.is_empty() {
            return bad("strategies: list at least one");
        }
        if let Some(b) = self.bursts
            && !(b.factor.is_finite() && b.factor > 0.0 && b.on_s > 0.0 && b.off_s >= 0.0)
        {
            return bad("bursts: factor and on_s must be positive, off_s at least 0");
        }
        if self.load_generator == LoadGenerator::InferencePerf
            && (self.bursts.is_some() || self.workload.long_share > 0.0 || !self.events.is_empty())
        {
            return bad(
                "load_generator: inference-perf cannot send bursts or mixed prompt lengths, or run events, here; use rust",
            );
        }
        if let Some(m) = self.max_rate {
            if m.concurrency == 0 || !(m.duration_s.is_finite() && m.duration_s > 0.0) {
                return bad("max_rate: concurrency must be at least 1 and duration_s positive");
            }
            if self.load_generator == LoadGenerator::InferencePerf {
                return bad("max_rate: the closed loop is sent by the rust load generator only");
            }
        }
        let clusters = &self.fleet.clusters;
        for (i, e) in self.events.iter().enumerate() {
            let named = e.stop.iter().chain(&e.start).collect::<Vec<_>>();
            if named.len() != 1 || !(e.at_s.is_finite() && e.at_s >= 0.0) {
                return Err(BenchError::Scenario(format!(
                    "events[{i}]: give at_s (seconds, at least 0) and one of stop or start"
                )));
            }
            if !clusters.contains(named[0]) {
                return Err(BenchError::Scenario(format!(
                    "events[{i}]: no cluster `{}` in fleet.clusters ({})",
                    named[0],
                    clusters.join(", ")
                )));
            }
        }
        for (i, w) in self.windows.iter().enumerate() {
            if !(w.from_s.is_finite() && w.to_s.is_finite() && 0.0 <= w.from_s && w.from_s < w.to_s)
            {
                return Err(BenchError::Scenario(format!(
                    "windows[{i}] ({}): from_s must be at least 0 and below to_s",
                    w.name
                )));
            }
        }
        for c in self
            .fleet
            .regions
            .keys()
            .chain(self.fleet.network_delay_ms.keys())
        {
            if !clusters.contains(c) {
                return Err(BenchError::Scenario(format!(
                    "fleet: regions and network_delay_ms name cluster `{c}`, which is not in fleet.clusters ({})",
                    clusters.join(", ")
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.workload.long_share) {
            return bad("workload.long_share: must be between 0 and 1");
        }
        for s in &self.strategies {
            s.resolve()?;
        }
        Ok(())
    }
}

/// What one (strategy, rate) cell measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub strategy: String,
    /// Offered requests per second; 0 for a closed-loop cell.
    pub rate: f64,
    /// The closed loop's clients, for a closed-loop (maximum rate) cell.
    #[serde(default)]
    pub concurrency: Option<usize>,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub ok_per_second: f64,
    pub ttft_ms: Option<Percentiles>,
    /// Mean time between tokens within each request, from first token to end.
    pub itl_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
    /// Time to first token of the short and of the long prompts, when the workload mixes them.
    #[serde(default)]
    pub ttft_short_ms: Option<Percentiles>,
    #[serde(default)]
    pub ttft_long_ms: Option<Percentiles>,
    /// Prefix-cache hits over queries, summed over the simulated servers.
    pub prefix_hit_rate: f64,
    /// Requests answered per server.
    pub per_server: BTreeMap<String, usize>,
    /// The busiest server's share of requests over an even share (1.0 = perfectly even).
    pub max_share_over_even: f64,
    /// The scenario's windows, in order.
    #[serde(default)]
    pub windows: Vec<WindowResult>,
    /// Per workload class, when the scenario has classes.
    #[serde(default)]
    pub classes: Vec<ClassResult>,
    /// CPU seconds fleetpick's threads used over the cell's load (warm-up included), when
    /// fleetpick is in the path.
    #[serde(default)]
    pub picker_cpu_seconds: Option<f64>,
    /// Good scrapes of fleetpick's `/metrics` during the cell, when the strategy scrapes.
    #[serde(default)]
    pub metrics_scrapes: Option<usize>,
}

/// What one workload class of a cell measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassResult {
    pub name: String,
    pub requests: usize,
    pub ok: usize,
    /// Refused with 429 (shed, or a full queue).
    pub shed: usize,
    /// Every answer but 200 (the shed ones included).
    pub errors: usize,
    /// Goodput: successful requests per second.
    pub ok_per_second: f64,
    pub ttft_ms: Option<Percentiles>,
}

/// What one window of a cell measured (requests that started in it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowResult {
    pub name: String,
    pub requests: usize,
    pub errors: usize,
    pub ttft_ms: Option<Percentiles>,
}

/// The results of a scenario run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub scenario: String,
    pub description: String,
    pub date: String,
    pub machine: String,
    pub servers: usize,
    pub duration_s: f64,
    /// Load before each cell's measured time (see [`Scenario::warmup_s`]).
    #[serde(default)]
    pub warmup_s: f64,
    pub prefix_upper_bound: f64,
    pub cells: Vec<CellResult>,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores, {model}")
}

/// Runs every cell of `scenario`; `progress` hears a line per cell.
pub async fn run(
    scenario: &Scenario,
    mut progress: impl FnMut(&str),
) -> Result<Results, BenchError> {
    let model = fleetpick_sim::params::EngineParams::default().model;
    let block_size = scenario
        .fleet
        .engine
        .block_size
        .unwrap_or(fleetpick_sim::params::EngineParams::default().block_size)
        as usize;
    let mut cells = Vec::new();
    for spec in &scenario.strategies {
        let strategy = spec.resolve()?;
        let loads = scenario
            .rates
            .iter()
            .map(|&r| Load::Rate(r))
            .chain(scenario.max_rate.map(|m| Load::Closed {
                concurrency: m.concurrency,
            }));
        for load in loads {
            let cell = run_cell(scenario, &strategy, load, &model).await?;
            progress(&format!(
                "{:<16} {:>9}: {:.1} ok/s, {} ok, {} errors, ttft p90 {} ms, hit rate {:.2}",
                strategy.name,
                match load {
                    Load::Rate(r) => format!("{r:.1}/s"),
                    Load::Closed { concurrency } => format!("closed {concurrency}"),
                },
                cell.ok_per_second,
                cell.ok,
                cell.errors,
                cell.ttft_ms
                    .as_ref()
                    .map_or("-".into(), |p| format!("{:.0}", p.p90)),
                cell.prefix_hit_rate
            ));
            cells.push(cell);
        }
    }
    Ok(Results {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        date: utc_now(),
        machine: machine(),
        servers: scenario.fleet.servers,
        duration_s: scenario.duration_s,
        warmup_s: scenario.warmup_s,
        prefix_upper_bound: scenario.workload.prefix_upper_bound(&model, block_size),
        cells,
    })
}

async fn run_cell(
    scenario: &Scenario,
    strategy: &Strategy,
    load: Load,
    model: &str,
) -> Result<CellResult, BenchError> {
    let sim = fleetpick_sim::Fleet::launch(FleetOptions {
        servers: scenario.fleet.servers,
        clusters: scenario.fleet.clusters.clone(),
        time_scale: scenario.fleet.time_scale,
        seed: scenario.seed,
        config: SimConfig {
            defaults: scenario.fleet.engine.clone(),
            clusters: scenario
                .fleet
                .network_delay_ms
                .iter()
                .map(|(c, &ms)| {
                    (
                        c.clone(),
                        fleetpick_sim::params::ClusterSettings {
                            network_delay_ms: ms,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..SimConfig::default()
        },
        ..FleetOptions::default()
    })
    .await?;
    let result = drive_cell(scenario, strategy, load, model, &sim).await;
    sim.shutdown().await;
    result
}

async fn drive_cell(
    scenario: &Scenario,
    strategy: &Strategy,
    load: Load,
    model: &str,
    sim: &fleetpick_sim::Fleet,
) -> Result<CellResult, BenchError> {
    let entries = sim.entries(None);
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut params = EnvoyParams {
        listen: loopback,
        admin: loopback,
        extproc: loopback,
        endpoints: entries
            .iter()
            .filter_map(|e| e.address.parse().ok())
            .collect(),
        body_mode: BodyMode::FullDuplex,
        localities: Vec::new(),
        extproc_tls: None,
    };
    let shape = &scenario.fleet;
    let region_of = |cluster: &str| shape.regions.get(cluster).map_or("default", |r| r.as_str());
    if strategy.locality {
        params.localities = shape
            .clusters
            .iter()
            .map(|c| fleetpick_envoy::Locality {
                region: region_of(c).to_string(),
                zone: c.clone(),
                priority: u32::from(
                    shape
                        .picker_region
                        .as_deref()
                        .is_some_and(|r| r != region_of(c)),
                ),
                endpoints: entries
                    .iter()
                    .filter(|e| e.cluster == *c)
                    .filter_map(|e| e.address.parse().ok())
                    .collect(),
            })
            .collect();
    }
    // fleetpick when the strategy uses it; stopped when `_picker` drops.
    let mut _picker = None;
    if let Some(weights) = &strategy.weights {
        // JSON is YAML's flow style.
        let scheduler = format!(
            "scheduler:\n  weights: {}\n",
            serde_json::to_string(weights).map_err(|e| BenchError::Scenario(e.to_string()))?
        );
        let regions: Vec<(&str, &str)> = shape
            .regions
            .iter()
            .map(|(c, r)| (c.as_str(), r.as_str()))
            .collect();
        let mut picker = shape
            .picker_region
            .as_ref()
            .map_or(String::new(), |r| format!("picker: {{region: {r}}}\n"));
        if !scenario.objectives.is_empty() {
            picker.push_str("objectives:\n");
            for o in &scenario.objectives {
                // JSON strings are YAML's double-quoted scalars: any name survives.
                let name = serde_json::to_string(&o.name)
                    .map_err(|e| BenchError::Scenario(e.to_string()))?;
                picker.push_str(&format!(
                    "  - {{name: {name}, pool: pool, priority: {}}}\n",
                    o.priority
                ));
            }
        }
        if strategy.flow_control {
            picker.push_str("flow_control: {enabled: true}\n");
        }
        if let Some(policy) = &scenario.policy {
            // JSON is YAML's flow style.
            picker.push_str(&format!("imports: [{{pool: pool, policy: {policy}}}]\n"));
        }
        let cfg = FleetConfig::parse(
            &fleetpick_sim::fleet::fleet_file(
                &entries,
                model,
                &regions,
                &format!("{picker}{scheduler}"),
            ),
            "bench fleet",
        )?;
        let started = MeasuredPicker::start(cfg, strategy.scrape_metrics_ms.is_some());
        let picker = started.map_err(|source| BenchError::Io {
            what: "cannot start fleetpick".into(),
            source,
        })?;
        params.extproc = picker.addr;
        let mut ready = false;
        for _ in 0..400 {
            if picker.fleet.eligible_count() == entries.len() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !ready {
            return Err(BenchError::NotReady);
        }
        _picker = Some(picker);
    }
    let envoy = EnvoyProcess::start(&render(strategy.flavor, &params)).await?;
    // Envoy listens before it routes (its active health checks, when configured, pass first):
    // the load starts once a request gets through.
    let probe = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| BenchError::Io {
            what: "cannot build an HTTP client".into(),
            source: std::io::Error::other(e),
        })?;
    let mut routed = false;
    for _ in 0..300 {
        if let Ok(r) = probe.get(envoy.url("/v1/models")).send().await
            && r.status().is_success()
        {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !routed {
        return Err(BenchError::NotRouting);
    }
    let workload = scenario.workload.workload(model);
    if let (LoadGenerator::InferencePerf, Load::Rate(rate)) = (scenario.load_generator, load) {
        let mut records = inference_perf(scenario, rate, model, &envoy.url("")).await?;
        drop(envoy);
        let wall = records.iter().map(|r| r.end_us).max().unwrap_or(0) as f64 / 1e6;
        let mut summary = loadgen::summarize(&mut records, wall);
        // inference-perf keeps no response headers: count answers per server at the servers.
        summary.per_server = sim
            .servers
            .iter()
            .map(|s| (s.name.clone(), s.status().completed as usize))
            .collect();
        return Ok(cell_result(
            scenario,
            strategy,
            load,
            sim,
            (0, 0),
            &workload,
            loadgen::Report { summary, records },
        ));
    }
    // The scenario's faults, timed from the start of the load.
    let servers: Vec<Arc<fleetpick_sim::server::SimServer>> = sim.servers.clone();
    let events = scenario.events.clone();
    let faults = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        for e in events {
            tokio::time::sleep_until(started + Duration::from_secs_f64(e.at_s)).await;
            for s in &servers {
                if e.stop.as_ref() == Some(&s.cluster.name) {
                    s.stop().await;
                } else if e.start.as_ref() == Some(&s.cluster.name)
                    && let Err(err) = s.start().await
                {
                    tracing::warn!(server = %s.name, error = %err, "cannot restart");
                }
            }
        }
    });
    // The prefix-cache counters as the warm-up ends, to count only what follows.
    let warmup = Duration::from_secs_f64(scenario.warmup_s);
    let counters_at_warm = {
        let servers: Vec<Arc<fleetpick_sim::server::SimServer>> = sim.servers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            prefix_counters(&servers)
        })
    };
    // One load per class (the whole workload when there are none), all at once.
    let one = [ClassSpec {
        name: String::new(),
        share: 1.0,
        objective: None,
        max_tokens: None,
        prompt_bytes: None,
    }];
    let classes: &[ClassSpec] = if scenario.classes.is_empty() {
        &one
    } else {
        &scenario.classes
    };
    let runs = classes.iter().enumerate().map(|(i, class)| {
        let mut w = workload.clone();
        w.max_tokens = class.max_tokens.unwrap_or(w.max_tokens);
        w.prompt_bytes = class.prompt_bytes.unwrap_or(w.prompt_bytes);
        if let Some(o) = &class.objective {
            w.headers.push((
                fleetpick_protocol::headers::OBJECTIVE_HEADER.to_string(),
                o.clone(),
            ));
        }
        let share = class.share;
        loadgen::run(LoadSpec {
            targets: vec![envoy.url("")],
            arrivals: match (load, scenario.bursts) {
                (Load::Closed { concurrency }, _) => Arrivals::Closed {
                    concurrency: ((concurrency as f64 * share).round() as usize).max(1),
                },
                (Load::Rate(rate), None) => Arrivals::Poisson {
                    rate: rate * share,
                    max_in_flight: 4096,
                },
                (Load::Rate(rate), Some(b)) => Arrivals::Bursts {
                    rate: rate * share,
                    factor: b.factor,
                    on_s: b.on_s,
                    off_s: b.off_s,
                    max_in_flight: 4096,
                },
            },
            workload: w,
            duration: warmup + Duration::from_secs_f64(load.duration_s(scenario)),
            max_requests: None,
            seed: scenario.seed ^ load.seed_bits() ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            watch_pid: None,
        })
    });
    let cpu_before = _picker.as_ref().and_then(|p| p.cpu_seconds());
    let scraper = match (&_picker, strategy.scrape_metrics_ms) {
        (Some(p), Some(ms)) => p.metrics.map(|a| scrape_metrics(a, ms)),
        _ => None,
    };
    let reports = futures_util::future::join_all(runs).await;
    // A thread that exited in between takes its time along: never below 0 (fleetpick's
    // threads live as long as it, but for Tokio's idle blocking threads).
    let picker_cpu = cpu_before.and_then(|b| {
        let after = _picker.as_ref().and_then(|p| p.cpu_seconds())?;
        Some((after - b).max(0.0))
    });
    let scrapes = match scraper {
        Some((task, count)) => {
            task.abort();
            Some(count.load(std::sync::atomic::Ordering::Relaxed))
        }
        None => None,
    };
    faults.abort();
    drop(envoy);
    let warm_us = warmup.as_micros() as u64;
    let duration = load.duration_s(scenario);
    let mut all = Vec::new();
    let mut per_class = Vec::new();
    for (class, report) in classes.iter().zip(reports) {
        let mut records = report?.records;
        records.retain(|r| r.start_us >= warm_us);
        if !scenario.classes.is_empty() {
            per_class.push(class_result(&class.name, &mut records, duration));
        }
        all.extend(records);
    }
    let baseline = if warmup.is_zero() {
        (0, 0)
    } else {
        counters_at_warm.await.unwrap_or((0, 0))
    };
    let summary = loadgen::summarize(&mut all, duration);
    let mut cell = cell_result(
        scenario,
        strategy,
        load,
        sim,
        baseline,
        &workload,
        loadgen::Report {
            summary,
            records: all,
        },
    );
    cell.classes = per_class;
    cell.picker_cpu_seconds = picker_cpu;
    cell.metrics_scrapes = scrapes;
    Ok(cell)
}

/// Scrapes `http://addr/metrics` every `every_ms` (as Prometheus would), counting good scrapes,
/// until the task is aborted.
fn scrape_metrics(
    addr: std::net::SocketAddr,
    every_ms: u64,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let task = tokio::spawn(async move {
        let Ok(client) = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
        else {
            return;
        };
        let url = format!("http://{addr}/metrics");
        let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
                && r.bytes().await.is_ok()
            {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (task, count)
}

/// One class's part of a cell.
fn class_result(name: &str, records: &mut [loadgen::RequestRecord], wall: f64) -> ClassResult {
    let s = loadgen::summarize(records, wall);
    ClassResult {
        name: name.to_string(),
        requests: s.requests,
        ok: s.ok,
        shed: records.iter().filter(|r| r.status == 429).count(),
        errors: s.errors,
        ok_per_second: s.ok_per_second,
        ttft_ms: s.ttft_ms,
    }
}

/// The simulated servers' prefix-cache (hits, queries), in tokens, summed.
fn prefix_counters(servers: &[Arc<fleetpick_sim::server::SimServer>]) -> (u64, u64) {
    servers
        .iter()
        .map(|s| s.status())
        .fold((0, 0), |(h, q), st| {
            (h + st.prefix_hits, q + st.prefix_queries)
        })
}

/// Runs inference-perf at `rate` against `url` for the scenario's duration and returns its
/// per-request records (bench/inference-perf/run.sh writes them in fleetpick's record format).
async fn inference_perf(
    scenario: &Scenario,
    rate: f64,
    model: &str,
    url: &str,
) -> Result<Vec<loadgen::RequestRecord>, BenchError> {
    let repo = fleetpick_envoy::repo_root();
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BenchError::Io { what, source }
    };
    // Removed however this ends, failures included.
    let scratch = tempfile::Builder::new()
        .prefix("fleetpick-iperf-")
        .tempdir()
        .map_err(io("cannot create inference-perf's directory"))?;
    let dir = scratch.path();
    let w = &scenario.workload;
    let tokens =
        |bytes: usize| ((bytes as f64 / INFERENCE_PERF_BYTES_PER_TOKEN).round() as u64).max(1);
    let data = if w.shared_prefix_bytes > 0 {
        format!(
            "  type: shared_prefix\n  shared_prefix: {{num_groups: {}, num_prompts_per_group: 64, system_prompt_len: {}, question_len: {}, output_len: {}, seed: {}}}\n",
            w.prefix_groups,
            tokens(w.shared_prefix_bytes),
            tokens(w.prompt_bytes),
            w.max_tokens,
            scenario.seed
        )
    } else {
        let n = tokens(w.prompt_bytes);
        let m = w.max_tokens;
        format!(
            "  type: synthetic\n  input_distribution: {{mean: {n}, std_dev: 0, min: {n}, max: {n}}}\n  output_distribution: {{mean: {m}, std_dev: 0, min: {m}, max: {m}}}\n"
        )
    };
    let api = match w.api {
        ApiKind::Completions => "completion",
        ApiKind::Chat => "chat",
    };
    let config = format!(
        "api: {{type: {api}, streaming: {}}}\ndata:\n{data}load:\n  type: poisson\n  stages: [{{rate: {rate}, duration: {}}}]\n  num_workers: 1\n  request_timeout: 300\nserver: {{type: vllm, ignore_eos: true}}\nreport:\n  request_lifecycle:\n    summary: true\n    per_stage: false\n    per_request: true\n    per_request_fields: {{request: false, response: false, info: true, response_chunks: false}}\n",
        w.stream,
        scenario.duration_s.ceil() as u64
    );
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, config).map_err(io("cannot write inference-perf's config"))?;
    let out = tokio::process::Command::new("bash")
        .arg(repo.join("bench/inference-perf/run.sh"))
        .arg(url)
        .arg(model)
        .arg(&config_path)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io("cannot run bench/inference-perf/run.sh"))?;
    if !out.status.success() {
        return Err(BenchError::Io {
            what: format!(
                "inference-perf failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            source: std::io::Error::other("inference-perf"),
        });
    }
    let records = std::fs::read(dir.join("records.json"))
        .map_err(io("cannot read inference-perf's records.json"))?;
    serde_json::from_slice(&records).map_err(|e| BenchError::Io {
        what: "inference-perf's records.json is not a list of records".into(),
        source: std::io::Error::other(e),
    })
}

fn cell_result(
    scenario: &Scenario,
    strategy: &Strategy,
    load: Load,
    sim: &fleetpick_sim::Fleet,
    (hits_before, queries_before): (u64, u64),
    workload: &Workload,
    report: loadgen::Report,
) -> CellResult {
    let (hits, queries) = prefix_counters(&sim.servers);
    let (hits, queries) = (
        hits.saturating_sub(hits_before),
        queries.saturating_sub(queries_before),
    );
    let s = &report.summary;
    let itl: Vec<f64> = report
        .records
        .iter()
        .filter(|r| r.status == 200 && r.error.is_none() && workload.max_tokens > 1)
        .filter_map(|r| {
            r.first_token_us
                .map(|f| (r.end_us - f) as f64 / 1000.0 / f64::from(workload.max_tokens - 1))
        })
        .collect();
    let ttft_of = |long: bool| {
        loadgen::percentiles(
            report
                .records
                .iter()
                .filter(|r| r.long_prompt == long && r.status == 200 && r.error.is_none())
                .filter_map(|r| r.first_token_us.map(|f| (f - r.start_us) as f64 / 1000.0))
                .collect(),
        )
    };
    let mixed = workload.long_share > 0.0;
    let even = s.ok as f64 / scenario.fleet.servers.max(1) as f64;
    let busiest = s.per_server.values().copied().max().unwrap_or(0) as f64;
    CellResult {
        strategy: strategy.name.clone(),
        rate: match load {
            Load::Rate(r) => r,
            Load::Closed { .. } => 0.0,
        },
        concurrency: match load {
            Load::Rate(_) => None,
            Load::Closed { concurrency } => Some(concurrency),
        },
        requests: s.requests,
        ok: s.ok,
        errors: s.errors,
        ok_per_second: s.ok_per_second,
        ttft_ms: s.ttft_ms.clone(),
        itl_ms: loadgen::percentiles(itl),
        e2e_ms: s.e2e_ms.clone(),
        ttft_short_ms: if mixed { ttft_of(false) } else { None },
        ttft_long_ms: if mixed { ttft_of(true) } else { None },
        prefix_hit_rate: if queries == 0 {
            0.0
        } else {
            hits as f64 / queries as f64
        },
        per_server: s.per_server.clone(),
        max_share_over_even: if even > 0.0 { busiest / even } else { 0.0 },
        classes: Vec::new(),
        picker_cpu_seconds: None,
        metrics_scrapes: None,
        windows: scenario
            .windows
            .iter()
            .map(|w| {
                let (from, to) = ((w.from_s * 1e6) as u64, (w.to_s * 1e6) as u64);
                let inside: Vec<&loadgen::RequestRecord> = report
                    .records
                    .iter()
                    .filter(|r| (from..to).contains(&r.start_us))
                    .collect();
                let ok = |r: &loadgen::RequestRecord| r.status == 200 && r.error.is_none();
                WindowResult {
                    name: w.name.clone(),
                    requests: inside.len(),
                    errors: inside.iter().filter(|r| !ok(r)).count(),
                    ttft_ms: loadgen::percentiles(
                        inside
                            .iter()
                            .filter(|r| ok(r))
                            .filter_map(|r| {
                                r.first_token_us.map(|f| (f - r.start_us) as f64 / 1000.0)
                            })
                            .collect(),
                    ),
                }
            })
            .collect(),
    }
}

/// Now in UTC, `YYYY-MM-DD HH:MM UTC`: when a benchmark ran, in its results and report.
pub fn utc_now() -> String {
    let rfc3339 = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // `2026-12-06T15:50:07Z`: the date and the minutes are the first 16 characters.
    format!(
        "{} UTC",
        rfc3339.get(..16).unwrap_or(&rfc3339).replacen('T', " ", 1)
    )
}

/// fleetpick in this process, and the CPU time of its threads (the cell's `picker_cpu_seconds`).
struct MeasuredPicker {
    inner: fleetpick::InProcess,
    /// Its threads (Linux tids), recorded as each starts.
    threads: Arc<parking_lot::Mutex<Vec<u32>>>,
}

impl MeasuredPicker {
    fn start(cfg: FleetConfig, metrics: bool) -> std::io::Result<MeasuredPicker> {
        let threads = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let record = threads.clone();
        let on_thread_start: fleetpick::in_process::ThreadHook = Arc::new(move || {
            if let Some(tid) = cpu::current_thread_id() {
                record.lock().push(tid);
            }
        });
        let options = fleetpick::in_process::Options {
            metrics,
            on_thread_start: Some(on_thread_start),
        };
        Ok(MeasuredPicker {
            inner: fleetpick::InProcess::start_with(cfg, options)?,
            threads,
        })
    }

    /// CPU seconds its threads have used (those still running: a Tokio blocking thread that
    /// exited takes its time along, and fleetpick hardly uses any); `None` without `/proc`.
    fn cpu_seconds(&self) -> Option<f64> {
        let threads = self.threads.lock();
        let times: Vec<f64> = threads
            .iter()
            .filter_map(|&t| cpu::thread_cpu_seconds(t))
            .collect();
        (!times.is_empty()).then(|| times.iter().sum())
    }
}

impl std::ops::Deref for MeasuredPicker {
    type Target = fleetpick::InProcess;

    fn deref(&self) -> &fleetpick::InProcess {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_parses_and_strategies_resolve() {
        let s: Scenario = serde_norway::from_str(
            "name: t\nfleet: {servers: 2}\nworkload: {prompt_bytes: 100, max_tokens: 8, shared_prefix_bytes: 300}\nrates: [1, 2]\nduration_s: 1\nstrategies: [round-robin, fleetpick, {name: no-kv, weights: {kv_cache: 0}}]\n",
        )
        .unwrap();
        s.validate().unwrap();
        let v = s.strategies[2].resolve().unwrap();
        assert_eq!(v.flavor, Flavor::OriginalDst);
        assert_eq!(v.weights.unwrap().kv_cache, 0.0);
        assert_eq!(v.weights.unwrap().queue, Weights::default().queue);
        // One group: every request shares the template's header and the 300 shared bytes,
        // which the simulator's tokenizer cuts into tokens; whole blocks of them count.
        let model = fleetpick_protocol::engine::DEFAULT_MODEL;
        let prefix = fleetpick_sim::template::sequences(
            InferenceRequest::parse(
                Api::Completions,
                serde_json::json!({"model": model, "prompt": fleetpick_loadgen::filler_text(0, 300)})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap()
            .input,
        )
        .remove(0);
        let bound = s.workload.prefix_upper_bound(model, 16);
        // At most the shared tokens' whole blocks over a 300 + 100-byte prompt; at least all
        // but the last partial word's block of them.
        let most = (prefix.len() / 16 * 16) as f64 / (prefix.len() as f64 + 100.0 / 6.0);
        let least = ((prefix.len() - 2) / 16 * 16) as f64 / (prefix.len() as f64 + 100.0);
        assert!(
            bound > least && bound <= most,
            "{least} < {bound} <= {most}"
        );
        assert_eq!(s.workload.prefix_upper_bound(model, 1 << 20), 0.0);
        let mut none = s.workload.clone();
        none.shared_prefix_bytes = 0;
        assert_eq!(none.prefix_upper_bound(model, 16), 0.0);
        let bad: Scenario = serde_norway::from_str(
            "name: t\nfleet: {servers: 2}\nworkload: {prompt_bytes: 1, max_tokens: 1}\nrates: [1]\nduration_s: 1\nstrategies: [magic]\n",
        )
        .unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("magic"));
        let with = |extra: &str| {
            let s: Scenario = serde_norway::from_str(&format!(
                "name: t\nfleet: {{servers: 2, clusters: [a, b], regions: {{a: r1}}}}\nworkload: {{prompt_bytes: 1, max_tokens: 1}}\nrates: [1]\nduration_s: 1\nstrategies: [locality-round-robin]\n{extra}"
            ))
            .unwrap();
            s.validate().map(|_| s)
        };
        let s = with("events: [{at_s: 1, stop: a}]\nwindows: [{name: w, from_s: 0, to_s: 1}]\n")
            .unwrap();
        assert!(s.strategies[0].resolve().unwrap().locality);
        let e = with("events: [{at_s: 1, stop: c}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("events[0]: no cluster `c`"), "{e}");
        let e = with("events: [{at_s: 1, stop: a, start: b}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("one of stop or start"), "{e}");
        let e = with("windows: [{name: w, from_s: 2, to_s: 1}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("windows[0] (w)"), "{e}");
    }

    #[test]
    fn date_is_plausible() {
        let d = utc_now();
        assert!(
            d.starts_with("20") && d.ends_with("UTC") && d.len() == 20,
            "{d}"
        );
    }
}
