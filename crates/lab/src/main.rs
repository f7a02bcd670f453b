//! The `fleetpick-lab` command line: `sim` (a simulated fleet), `load` (the load generator),
//! `bench` (a benchmark scenario through every routing strategy) and `demo`. The picker itself
//! is the `fleetpick` command.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetpick::logs::LogFormat;
use fleetpick_loadgen::{self as loadgen, Arrivals, LoadSpec, Workload};
use fleetpick_protocol::openai::Api;
use fleetpick_sim::params::{MetricsFormat, SimConfig};
use fleetpick_sim::{Fleet, FleetOptions, ReadyEntry};

#[derive(Parser)]
#[command(
    name = "fleetpick-lab",
    version,
    about = "fleetpick's lab: a simulated fleet, a load generator, benchmarks and the demo"
)]
struct Cli {
    /// Log lines for people (`human`) or one JSON object per line (`json`). Levels: `RUST_LOG`.
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fleet of simulated model servers in this process.
    Sim(SimArgs),
    /// Send load to simulated servers (or any OpenAI endpoint) and report what happened.
    Load(LoadArgs),
    /// Run a benchmark scenario through every routing strategy (behind the real Envoy) and
    /// write results.json and report.md.
    Bench {
        /// The scenario file (YAML), such as bench/scenarios/steady.yaml.
        #[arg(long)]
        scenario: PathBuf,
        /// Output directory (default bench/out/<scenario name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seconds per cell (a quick look).
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Run the demo: a simulated multi-cluster fleet under load, shown live.
    Demo {
        /// Speed-up of every simulated duration.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Number of servers.
    #[arg(long, default_value_t = 4)]
    servers: usize,
    /// Cluster names; servers are spread over them in contiguous groups.
    #[arg(long, value_delimiter = ',', default_value = "local")]
    clusters: Vec<String>,
    /// Address every server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// One port per server (default: each binds port 0).
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Once every server listens, write a JSON array of {name, cluster, address, admin} here.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// YAML file with per-cluster and per-server engine parameters.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Every simulated duration is divided by this factor.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Metric names served on /metrics (overrides the config file).
    #[arg(long, value_enum)]
    metrics_format: Option<MetricsFormat>,
    /// Address of the admin API (faults, stop and start).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: SocketAddr,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// A ready file written by `fleetpick-lab sim`: load goes round robin over its servers.
    #[arg(long, conflicts_with = "target")]
    ready_file: Option<PathBuf>,
    /// Base URL(s) to send to, such as http://127.0.0.1:8080.
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// Closed loop: this many concurrent clients.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Cap on outstanding requests with --rate.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<usize>,
    #[arg(long, default_value = "completions")]
    api: String,
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    #[arg(long, default_value_t = 64)]
    prompt_bytes: usize,
    #[arg(long, default_value_t = 0)]
    shared_prefix_bytes: usize,
    #[arg(long, default_value_t = 1)]
    prefix_groups: usize,
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    #[arg(long)]
    stream: bool,
    /// Send GET requests to this path instead of inference requests (such as /metrics).
    #[arg(long)]
    get: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Report this process's CPU time over the run too (the simulator's pid, say).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Write the summary and every request's record as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    fleetpick::logs::exit("fleetpick-lab", run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (runtime, _logs) = fleetpick::logs::runtime(cli.log_format)?;
    runtime.block_on(async {
        match cli.command {
            Command::Sim(args) => sim(args).await,
            Command::Load(args) => load(args).await,
            Command::Bench {
                scenario,
                out,
                duration,
            } => bench(&scenario, out, duration).await,
            Command::Demo { time_scale } => fleetpick_lab::demo::run(time_scale).await,
        }
    })
}

async fn bench(
    path: &std::path::Path,
    out: Option<PathBuf>,
    duration: Option<f64>,
) -> anyhow::Result<()> {
    let mut scenario = fleetpick_lab::bench::Scenario::load(path)?;
    if let Some(d) = duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        scenario.duration_s = d;
    }
    let dir = out.unwrap_or_else(|| PathBuf::from("bench/out").join(&scenario.name));
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!(
        "scenario {}: {} strategies x {} rates, {} s a cell",
        scenario.name,
        scenario.strategies.len(),
        scenario.rates.len(),
        scenario.duration_s
    );
    let results = fleetpick_lab::bench::run(&scenario, |line| println!("  {line}")).await?;
    fleetpick_lab::bench::report::write(&results, &dir, &command)?;
    println!(
        "wrote {}/results.json and {}/report.md",
        dir.display(),
        dir.display()
    );
    Ok(())
}

async fn sim(args: SimArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => SimConfig::load(path)?,
        None => SimConfig::default(),
    };
    let fleet = Arc::new(
        Fleet::launch(FleetOptions {
            servers: args.servers,
            clusters: args.clusters,
            listen: args.listen,
            ports: args.ports,
            seed: args.seed,
            time_scale: args.time_scale,
            config,
            metrics_format: args.metrics_format,
        })
        .await?,
    );
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("admin API cannot listen on {}", args.admin_listen))?;
    let admin_addr = admin.local_addr()?;
    let admin_task = tokio::spawn(fleet.clone().serve_admin(admin));
    // Logged before the ready file appears, so whoever waits on the file finds the line too.
    tracing::info!(servers = fleet.servers.len(), admin = %admin_addr, "simulated fleet ready");
    if let Some(path) = &args.ready_file {
        fleet.write_ready_file(path, Some(admin_addr))?;
    }
    for e in fleet.entries(Some(admin_addr)) {
        println!("{}", serde_json::to_string(&e)?);
    }
    fleetpick::serve::shutdown_signal().await;
    tracing::info!("stopping the simulated fleet");
    admin_task.abort();
    fleet.shutdown().await;
    Ok(())
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let targets = match &args.ready_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let entries: Vec<ReadyEntry> = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a simulator ready file", path.display()))?;
            entries
                .into_iter()
                .map(|e| format!("http://{}", e.address))
                .collect()
        }
        None => args.target.clone(),
    };
    if targets.is_empty() {
        bail!("give --ready-file or --target");
    }
    let api = match args.api.as_str() {
        "completions" => Api::Completions,
        "chat" => Api::ChatCompletions,
        other => bail!("--api must be completions or chat, not {other}"),
    };
    let arrivals = match (args.concurrency, args.rate) {
        (_, Some(rate)) => Arrivals::Poisson {
            rate,
            max_in_flight: args.max_in_flight,
        },
        (Some(c), None) => Arrivals::Closed { concurrency: c },
        (None, None) => Arrivals::Closed { concurrency: 16 },
    };
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    let report = loadgen::run(LoadSpec {
        targets,
        arrivals,
        workload: Workload {
            api,
            model: args.model,
            prompt_bytes: args.prompt_bytes,
            shared_prefix_bytes: args.shared_prefix_bytes,
            prefix_groups: args.prefix_groups,
            max_tokens: args.max_tokens,
            stream: args.stream,
            get_path: args.get,
            ..Workload::default()
        },
        duration: Duration::from_secs_f64(args.duration),
        max_requests: args.requests,
        seed: args.seed,
        watch_pid: args.watch_pid,
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report.summary)?);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
