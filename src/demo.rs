//! The newcomer's demo: a simulated fleet of three clusters in two regions, load sent to it,
//! and a live table of where requests went and how each server is loaded.
//!
//! Today the load is spread round robin straight over the servers, as a Kubernetes Service
//! would: it shows the simulator's behaviour (queues, KV use, prefix hits, a cluster lost and
//! back) and the baseline the picker is built to beat. Envoy and the picker join the demo as
//! they land (issues 3 and 5).

use std::time::Duration;

use crate::loadgen::{self, Arrivals, LoadSpec, Workload};
use crate::sim::params::{ClusterSettings, SimConfig};
use crate::sim::{Fleet, FleetOptions};

/// One step of the demo script.
struct Phase {
    title: &'static str,
    seconds: u64,
    concurrency: usize,
    /// Stop (`Some(false)`) or start (`Some(true)`) cluster us-east-b before the step.
    east_b_up: Option<bool>,
}

/// Runs the demo script; `time_scale` speeds up the simulated servers.
pub async fn run(time_scale: f64) -> anyhow::Result<()> {
    let mut config = SimConfig::default();
    // Small batches, so that the burst visibly queues.
    config.defaults.max_num_seqs = Some(8);
    config.clusters.insert(
        "eu-west".to_string(),
        ClusterSettings {
            network_delay_ms: 80.0,
            ..ClusterSettings::default()
        },
    );
    let fleet = Fleet::launch(FleetOptions {
        servers: 6,
        clusters: vec!["us-east-a".into(), "us-east-b".into(), "eu-west".into()],
        time_scale,
        config,
        ..FleetOptions::default()
    })
    .await?;
    println!(
        "fleetpick demo: 6 simulated vLLM servers (8 sequences per batch) in 3 clusters; eu-west is 80 ms away"
    );
    for e in fleet.entries(None) {
        println!("  {:<12} {:<10} http://{}", e.name, e.cluster, e.address);
    }
    let targets: Vec<String> = fleet
        .entries(None)
        .into_iter()
        .map(|e| format!("http://{}", e.address))
        .collect();
    let phases = [
        Phase {
            title: "steady traffic, round robin over every server",
            seconds: 4,
            concurrency: 24,
            east_b_up: None,
        },
        Phase {
            title: "a burst: four times the clients",
            seconds: 4,
            concurrency: 96,
            east_b_up: None,
        },
        Phase {
            title: "cluster us-east-b is lost (its servers refuse connections)",
            seconds: 4,
            concurrency: 24,
            east_b_up: Some(false),
        },
        Phase {
            title: "us-east-b is back",
            seconds: 4,
            concurrency: 24,
            east_b_up: Some(true),
        },
    ];
    for (n, phase) in phases.iter().enumerate() {
        if let Some(up) = phase.east_b_up {
            for s in fleet
                .servers
                .iter()
                .filter(|s| s.cluster.name == "us-east-b")
            {
                if up {
                    s.start().await?;
                } else {
                    s.stop().await;
                }
            }
        }
        println!("\n== step {}: {} ==", n + 1, phase.title);
        let spec = LoadSpec {
            targets: targets.clone(),
            arrivals: Arrivals::Closed {
                concurrency: phase.concurrency,
            },
            workload: Workload {
                shared_prefix_bytes: 2048,
                prefix_groups: 4,
                prompt_bytes: 256,
                max_tokens: 24,
                stream: true,
                ..Workload::default()
            },
            duration: Duration::from_secs(phase.seconds),
            max_requests: None,
            seed: n as u64,
            watch_pid: None,
        };
        let load = tokio::spawn(loadgen::run(spec));
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        while !load.is_finished() {
            ticker.tick().await;
            print_table(&fleet);
        }
        let report = load.await??;
        let s = &report.summary;
        let ttft = s
            .ttft_ms
            .as_ref()
            .map_or("-".into(), |p| format!("{:.0}/{:.0} ms", p.p50, p.p90));
        println!(
            "-> {} requests, {} ok, {} failed; time to first token p50/p90 {}; share: {}",
            s.requests,
            s.ok,
            s.errors,
            ttft,
            s.per_server
                .iter()
                .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / s.ok.max(1) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match n {
            2 => println!(
                "   Round robin keeps sending to the dead cluster: every third request fails. A picker drops it."
            ),
            1 => println!(
                "   Queues build evenly, and the far cluster adds its round trip to every third request."
            ),
            _ => {}
        }
    }
    fleet.shutdown().await;
    Ok(())
}

fn print_table(fleet: &Fleet) {
    println!(
        "  {:<12} {:<10} {:>4} {:>7} {:>7} {:>6} {:>9} {:>6}",
        "server", "cluster", "up", "running", "waiting", "kv", "prefix", "done"
    );
    for s in &fleet.servers {
        let st = s.status();
        let hit = if st.prefix_queries == 0 {
            0.0
        } else {
            100.0 * st.prefix_hits as f64 / st.prefix_queries as f64
        };
        println!(
            "  {:<12} {:<10} {:>4} {:>7} {:>7} {:>5.0}% {:>8.0}% {:>6}",
            st.name,
            st.cluster,
            if st.up { "yes" } else { "NO" },
            st.running,
            st.waiting,
            st.kv_usage * 100.0,
            hit,
            st.completed
        );
    }
}
