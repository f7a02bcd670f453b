//! The `fleetpick` command line: `serve` (the picker), `check-config`, `sim` (the simulated
//! fleet), `load` (the load generator), `demo`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetpick::config::FleetConfig;
use fleetpick::envoy::{BodyMode, EnvoyParams, Flavor};
use fleetpick::loadgen::{self, Arrivals, LoadSpec, Workload};
use fleetpick::openai::Api;
use fleetpick::sim::params::{MetricsFormat, SimConfig};
use fleetpick::sim::{Fleet, FleetOptions, ReadyEntry};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "fleetpick",
    version,
    about = "An endpoint picker for LLM inference behind Envoy"
)]
struct Cli {
    /// Log lines for people (`human`) or one JSON object per line for log pipelines (`json`).
    /// Levels and targets: `RUST_LOG` (default `info`; `fleetpick=debug` explains every pick).
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The fleet file (YAML).
    #[arg(long)]
    config: PathBuf,
    /// Listen here instead of the fleet file's `server.listen` (port 0: any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve fleetpick's own Prometheus metrics on this address (`/metrics`), instead of
    /// the fleet file's `server.metrics_listen`.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The region this picker runs in (it prefers clusters there), instead of the fleet
    /// file's `picker.region`.
    #[arg(long)]
    region: Option<String>,
    /// Once listening, write {"grpc": "ip:port", "metrics": "ip:port"} here.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the picker: the Envoy ext_proc gRPC service for the fleet in FILE.
    Serve(ServeArgs),
    /// Print an Envoy configuration wired to fleetpick (or a baseline without it).
    EnvoyConfig {
        /// original-dst, fallback, round-robin or least-request.
        #[arg(long, default_value = "original-dst")]
        flavor: Flavor,
        /// full-duplex or buffered: how Envoy hands the request body to fleetpick.
        #[arg(long, default_value = "full-duplex")]
        body_mode: BodyMode,
        /// Client-facing listener.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Envoy's admin interface.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// fleetpick's ext_proc address.
        #[arg(long)]
        extproc: Option<SocketAddr>,
        /// Model-server endpoints of the static cluster (fallback and baselines); repeat or
        /// separate with commas.
        #[arg(long = "endpoint", value_delimiter = ',')]
        endpoints: Vec<SocketAddr>,
        /// Reach fleetpick over mutual TLS with the files in this directory: ca.crt (the CA of
        /// fleetpick's certificate), envoy.crt and envoy.key (Envoy's client certificate), as
        /// envoy/envoy-tls.yaml does with /etc/fleetpick/tls.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Validate a fleet file and summarize it.
    CheckConfig {
        /// The fleet file (YAML).
        file: PathBuf,
    },
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
    /// GET a URL and exit 0 if it answers 200: a health check for images without curl
    /// (`fleetpick probe http://127.0.0.1:9090/readyz`).
    Probe {
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
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
    /// A ready file written by `fleetpick sim`: load goes round robin over its servers.
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Inside the runtime: the OTLP exporter's gRPC client lives on it.
    let _otlp = {
        let _entered = runtime.enter();
        init_logs(cli.log_format)?
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::CheckConfig { file } => check_config(&file),
            Command::EnvoyConfig {
                flavor,
                body_mode,
                listen,
                admin,
                extproc,
                endpoints,
                tls_dir,
            } => {
                let d = fleetpick::envoy::user_defaults();
                let extproc_tls = tls_dir.map(|dir| {
                    let file = |name: &str| dir.join(name).display().to_string();
                    fleetpick::envoy::ExtProcTls {
                        ca_file: file("ca.crt"),
                        client_cert: Some((file("envoy.crt"), file("envoy.key"))),
                        ..fleetpick::envoy::user_tls()
                    }
                });
                let params = EnvoyParams {
                    listen: listen.unwrap_or(d.listen),
                    admin: admin.unwrap_or(d.admin),
                    extproc: extproc.unwrap_or(d.extproc),
                    endpoints: if endpoints.is_empty() {
                        d.endpoints
                    } else {
                        endpoints
                    },
                    body_mode,
                    localities: Vec::new(),
                    extproc_tls,
                };
                print!("{}", fleetpick::envoy::render(flavor, &params));
                Ok(())
            }
            Command::Sim(args) => sim(args).await,
            Command::Load(args) => load(args).await,
            Command::Bench {
                scenario,
                out,
                duration,
            } => bench(&scenario, out, duration).await,
            Command::Demo { time_scale } => fleetpick::demo::run(time_scale).await,
            Command::Probe { url, timeout } => probe(&url, timeout).await,
        }
    })
}

/// What must live as long as the process for logs and traces (the OTLP exporter, flushed when
/// it drops).
#[cfg(feature = "otlp")]
type LogGuard = Option<fleetpick::trace::otlp::Guard>;
#[cfg(not(feature = "otlp"))]
struct LogGuard;

/// Logs to stderr in `format`, levels from `RUST_LOG` (default `info`); with the `otlp`
/// feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, request spans exported too.
fn init_logs(format: LogFormat) -> anyhow::Result<LogGuard> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let logs = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otlp")]
    {
        let (layer, guard) = fleetpick::trace::otlp::layer()?.unzip();
        let exporting = layer.is_some();
        logs.with(layer).init();
        fleetpick::trace::otlp::ENABLED.store(exporting, std::sync::atomic::Ordering::Relaxed);
        if exporting {
            tracing::info!("exporting request spans over OTLP");
        }
        Ok(guard)
    }
    #[cfg(not(feature = "otlp"))]
    {
        logs.init();
        Ok(LogGuard)
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let source = fleetpick::serve::ConfigSource::load(args.config.clone(), args.region)?;
    let cfg = source.loaded.clone();
    let addr = fleetpick::serve::listen_addr(&cfg, args.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let metrics = match fleetpick::serve::metrics_addr(&cfg, args.metrics_listen) {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("metrics cannot listen on {a}"))?,
        ),
        None => None,
    };
    let metrics_bound = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(%bound, metrics = ?metrics_bound, region = ?cfg.file.picker.region, endpoints = cfg.endpoints.len(), "fleetpick ext_proc listening");
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({
                "grpc": bound.to_string(),
                "metrics": metrics_bound.map(|a| a.to_string()),
            })
            .to_string(),
        )
        .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let tls = match &cfg.file.server.tls {
        Some(t) => {
            let base = args.config.parent().unwrap_or(std::path::Path::new(""));
            let tls = fleetpick::tls::Tls::load(t, base)?;
            tracing::info!(mutual = tls.mutual(), "ext_proc listener: TLS");
            Some(std::sync::Arc::new(tls))
        }
        None => None,
    };
    let io = fleetpick::serve::Io {
        grpc: listener,
        tls,
        metrics,
        config_file: Some(source),
    };
    fleetpick::serve::serve(cfg, io, shutdown_signal()).await?;
    tracing::info!("fleetpick stopped");
    Ok(())
}

async fn bench(
    path: &std::path::Path,
    out: Option<PathBuf>,
    duration: Option<f64>,
) -> anyhow::Result<()> {
    let mut scenario = fleetpick::bench::Scenario::load(path)?;
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
    let results = fleetpick::bench::run(&scenario, |line| println!("  {line}")).await?;
    fleetpick::bench::report::write(&results, &dir, &command)?;
    println!(
        "wrote {}/results.json and {}/report.md",
        dir.display(),
        dir.display()
    );
    Ok(())
}

async fn probe(url: &str, timeout: f64) -> anyhow::Result<()> {
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs_f64(timeout))
        .build()
        .context("cannot build an HTTP client")?;
    let status = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .status();
    if status != reqwest::StatusCode::OK {
        bail!("GET {url}: {status}");
    }
    Ok(())
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let cfg = FleetConfig::load(file)?;
    let f = &cfg.file;
    let regions: std::collections::BTreeSet<&str> =
        f.clusters.iter().map(|c| c.region.as_str()).collect();
    let imported = cfg.policies.iter().filter(|p| p.is_some()).count();
    let dry = cfg.policies.iter().flatten().filter(|p| p.dry_run).count();
    println!(
        "{}: ok: {} clusters in {} regions, {} pools ({imported} imported, {dry} in dry run), {} endpoints served, {} models and {} LoRA adapters, {} rewrites, {} pools with session affinity, {} objectives; picker region: {}",
        file.display(),
        f.clusters.len(),
        regions.len(),
        f.pools.len(),
        cfg.endpoints.len(),
        f.pools.iter().map(|p| p.models.len()).sum::<usize>(),
        f.pools.iter().map(|p| p.lora_adapters.len()).sum::<usize>(),
        f.rewrites.len(),
        f.pools
            .iter()
            .filter(|p| p.session_affinity.is_some())
            .count(),
        cfg.objectives.len(),
        f.picker
            .region
            .as_deref()
            .unwrap_or("none (every cluster local)")
    );
    // The TLS files load as `serve` would load them (a key that does not match its certificate
    // is found here, not at deploy time).
    let tls = match &f.server.tls {
        Some(t) => {
            let base = file.parent().unwrap_or(std::path::Path::new(""));
            let tls = fleetpick::tls::Tls::load(t, base)?;
            if tls.mutual() { "mutual" } else { "on" }
        }
        None => "off",
    };
    println!("ext_proc TLS: {tls}");
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
    shutdown_signal().await;
    tracing::info!("stopping the simulated fleet");
    admin_task.abort();
    fleet.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
