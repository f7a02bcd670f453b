//! The `fleetpick` command line: `serve` (the picker), `check-config`, `envoy-config`, `probe`.
//! The lab's commands (simulator, load generator, benchmarks, demo) are `fleetpick-lab`'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetpick::logs::LogFormat;
use fleetpick_config::FleetConfig;
use fleetpick_envoy::{BodyMode, EnvoyParams, Flavor};

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
    /// GET a URL and exit 0 if it answers 200: a health check for images without curl
    /// (`fleetpick probe http://127.0.0.1:9090/readyz`).
    Probe {
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    fleetpick::logs::exit("fleetpick", run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (runtime, _logs) = fleetpick::logs::runtime(cli.log_format)?;
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
                let d = fleetpick_envoy::user_defaults();
                let extproc_tls = tls_dir.map(|dir| {
                    let file = |name: &str| dir.join(name).display().to_string();
                    fleetpick_envoy::ExtProcTls {
                        ca_file: file("ca.crt"),
                        client_cert: Some((file("envoy.crt"), file("envoy.key"))),
                        ..fleetpick_envoy::user_tls()
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
                print!("{}", fleetpick_envoy::render(flavor, &params));
                Ok(())
            }
            Command::Probe { url, timeout } => probe(&url, timeout).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let source = fleetpick::reload::ConfigSource::load(args.config.clone(), args.region)?;
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
    fleetpick::serve::serve(cfg, io, fleetpick::serve::shutdown_signal()).await?;
    tracing::info!("fleetpick stopped");
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
