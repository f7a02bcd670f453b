//! Objectives, admission and flow control end to end: clients, the real Envoy, fleetpick and a
//! simulated server driven past its capacity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::envoy::{self, Envoy};
use common::{MODEL, Picker, Sim, TempDir, client, fleet_yaml, wait_for};
use fleetpick::envoy::{BodyMode, Flavor};
use serde_json::json;

const POLL: &str = "poller: {interval_ms: 20, stale_after_ms: 2000, backoff_max_ms: 200}\n";

/// One simulated server that runs two sequences at once, fleetpick with `extra` (YAML), and
/// Envoy in front.
async fn overloadable(extra: &str) -> (Sim, TempDir, Picker, Envoy) {
    let dir = TempDir::new("sim-cfg");
    let cfg = dir.0.join("sim.yaml");
    std::fs::write(&cfg, "defaults: {max_num_seqs: 2}\n").unwrap();
    let sim = Sim::start(&[
        "--servers",
        "1",
        "--time-scale",
        "10",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    let picker = Picker::start(&fleet_yaml(
        &sim.entries,
        &format!("{POLL}imports: [{{pool: pool, policy: {{queue_threshold: 1}}}}]\n{extra}"),
    ))
    .await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    let url = envoy.url("/v1/completions");
    wait_for("a first routed request", Duration::from_secs(30), || {
        let url = url.clone();
        async move { (common::complete(&client(), &url, &[]).await.0 == 200).then_some(()) }
    })
    .await;
    (sim, dir, picker, envoy)
}

/// Sends completions with `headers` in a closed loop until `done` reaches `until`; counts its
/// successes in `ok` and returns the statuses it saw that were not 200.
async fn closed_loop(
    url: String,
    headers: Vec<(&'static str, String)>,
    ok: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    until: usize,
) -> Vec<u16> {
    let c = client();
    let mut other = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while done.load(Ordering::Relaxed) < until && tokio::time::Instant::now() < deadline {
        let mut req = c
            .post(&url)
            .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 8}));
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let status = match req.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                let _ = r.bytes().await;
                s
            }
            Err(_) => 0,
        };
        if status == 200 {
            ok.fetch_add(1, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
        } else {
            other.push(status);
        }
    }
    other
}

#[tokio::test]
async fn two_flows_of_equal_priority_share_a_saturated_pool_equally() {
    let (_sim, _d, _picker, envoy) = overloadable("flow_control: {enabled: true}\n").await;
    let url = envoy.url("/v1/completions");
    let done = Arc::new(AtomicUsize::new(0));
    let (heavy, light) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    const TOTAL: usize = 300;
    let mut clients = Vec::new();
    // The heavy tenant has three times the clients of the light one; both want more than half
    // of the server.
    for (flow, n, count) in [("heavy", 12, &heavy), ("light", 4, &light)] {
        for _ in 0..n {
            clients.push(tokio::spawn(closed_loop(
                url.clone(),
                vec![("x-gateway-inference-fairness-id", flow.to_string())],
                count.clone(),
                done.clone(),
                TOTAL,
            )));
        }
    }
    for c in clients {
        let other = c.await.unwrap();
        assert!(other.is_empty(), "every request completes: {other:?}");
    }
    let (h, l) = (heavy.load(Ordering::Relaxed), light.load(Ordering::Relaxed));
    let share = l as f64 / (h + l) as f64;
    eprintln!("fairness: heavy {h}, light {l}, light's share {share:.3}");
    assert!(
        (0.45..=0.55).contains(&share),
        "light flow's share {share:.3} (heavy {h}, light {l}); FIFO would give it 0.25"
    );
}

#[tokio::test]
async fn sheddable_traffic_is_shed_and_priority_traffic_is_served_at_overload() {
    let (_sim, _d, picker, envoy) = overloadable(
        "objectives:\n  - {name: batch, pool: pool, priority: -1}\n  - {name: chat, pool: pool, priority: 10}\nflow_control: {enabled: true}\n",
    )
    .await;
    let url = envoy.url("/v1/completions");
    let done = Arc::new(AtomicUsize::new(0));
    const TOTAL: usize = 120;
    let (batch_ok, chat_ok) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Batch traffic alone would keep the server full; its 429s do not count towards TOTAL.
    let batch_done = Arc::new(AtomicUsize::new(0));
    let stop_batch = TOTAL * 100;
    let mut batch = Vec::new();
    for _ in 0..6 {
        batch.push(tokio::spawn(closed_loop(
            url.clone(),
            vec![("x-gateway-inference-objective", "batch".to_string())],
            batch_ok.clone(),
            batch_done.clone(),
            stop_batch,
        )));
    }
    let mut chat = Vec::new();
    for _ in 0..4 {
        chat.push(tokio::spawn(closed_loop(
            url.clone(),
            vec![("x-gateway-inference-objective", "chat".to_string())],
            chat_ok.clone(),
            done.clone(),
            TOTAL,
        )));
    }
    for c in chat {
        let other = c.await.unwrap();
        assert!(
            other.is_empty(),
            "every priority request is served: {other:?}"
        );
    }
    // Stop the batch clients (they loop until this count).
    batch_done.store(stop_batch, Ordering::Relaxed);
    let mut shed = 0;
    for b in batch {
        let other = b.await.unwrap();
        assert!(
            other.iter().all(|s| *s == 429),
            "batch sees only 429 besides 200: {other:?}"
        );
        shed += other.len();
    }
    assert!(shed > 0, "the pool saturated and batch requests were shed");
    assert!(
        batch_ok.load(Ordering::Relaxed) > 0,
        "batch is served when there is room"
    );
    let page = picker.metrics_page().await;
    assert!(
        page.contains(
            "fleetpick_flow_requests_total{pool=\"pool\",priority=\"-1\",outcome=\"shed\"}"
        ),
        "{page}"
    );
}

#[tokio::test]
async fn a_client_that_gives_up_while_queued_takes_no_slot() {
    let (sim, _d, picker, envoy) = overloadable("flow_control: {enabled: true}\n").await;
    // Fill the server (two running, then the queue) with long requests straight to it.
    let mut background = Vec::new();
    for _ in 0..3 {
        let url = sim.url(0, "/v1/completions");
        background.push(tokio::spawn(async move {
            if let Ok(r) = client()
                .post(url)
                .json(
                    &json!({"model": MODEL, "prompt": "long", "max_tokens": 4000, "stream": true}),
                )
                .send()
                .await
            {
                let _ = r.bytes().await;
            }
        }));
    }
    let page_url = format!("http://{}/metrics", picker.metrics);
    wait_for("the pool saturated", Duration::from_secs(20), || {
        let u = page_url.clone();
        async move {
            common::metric(&common::metrics_page(&u).await, "fleetpick_pool_free_slots")
                .is_some_and(|v| v == 0.0)
                .then_some(())
        }
    })
    .await;
    let page = picker.metrics_page().await;
    assert!(
        page.contains("fleetpick_cluster_free_slots{pool=\"pool\",cluster=\"local\"} 0"),
        "the detector per cluster: {page}"
    );
    // Clients that give up after a moment in the queue.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for _ in 0..5 {
        let r = impatient
            .post(envoy.url("/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
            .send()
            .await;
        assert!(r.is_err(), "held in the queue until the client gave up");
    }
    wait_for(
        "the cancellations counted",
        Duration::from_secs(20),
        || async {
            let page = picker.metrics_page().await;
            let cancelled = page
                .lines()
                .find(|l| l.starts_with("fleetpick_flow_requests_total") && l.contains("cancelled"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
            (cancelled == Some(5.0)).then_some(())
        },
    )
    .await;
    let page = picker.metrics_page().await;
    assert!(
        page.contains("fleetpick_flow_queue_length{pool=\"pool\",priority=\"0\"} 0"),
        "{page}"
    );
    let in_flight: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("fleetpick_endpoint_in_flight{"))
        .collect();
    assert!(
        !in_flight.is_empty() && in_flight.iter().all(|l| l.ends_with(" 0")),
        "nothing counted in flight for the clients that left: {in_flight:?}"
    );
    for b in background {
        b.abort();
    }
    // Capacity back: the next request goes through at once.
    let (status, _) = common::complete(&client(), &envoy.url("/v1/completions"), &[]).await;
    assert_eq!(status, 200);
}
