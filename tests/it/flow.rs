//! Objectives, admission and flow control end to end: clients, the real Envoy, fleetpick and a
//! simulated server driven past its capacity.

use fleetpick_tests as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::envoy::{self, Envoy};
use common::{MODEL, Picker, Sim, client, fleet_yaml, wait_for};
use fleetpick_envoy::{BodyMode, Flavor};
use serde_json::json;

const POLL: &str = "poller: {interval_ms: 20, stale_after_ms: 2000, backoff_max_ms: 200}\n";

/// One simulated server that runs two sequences at once, fleetpick with `extra` (YAML), and
/// Envoy in front.
async fn overloadable(extra: &str) -> (Sim, Picker, Envoy) {
    let sim = Sim::start_with_config(
        &["--servers", "1", "--time-scale", "10"],
        "defaults: {max_num_seqs: 2}\n",
    )
    .await;
    let picker = Picker::start(&fleet_yaml(
        &sim.entries,
        &format!("{POLL}imports: [{{pool: pool, policy: {{queue_threshold: 1}}}}]\n{extra}"),
    ))
    .await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    (sim, picker, envoy)
}

/// Waits until fleetpick's saturation detector says the pool has no free slot.
async fn until_saturated(picker: &Picker) {
    wait_for("the pool saturated", Duration::from_secs(20), || async {
        common::metric(&picker.metrics_page().await, "fleetpick_pool_free_slots")
            .is_some_and(|v| v == 0.0)
            .then_some(())
    })
    .await;
}

/// What one closed-loop client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Statuses other than 200.
    other: Vec<u16>,
    /// For each success, the requests it found waiting at the server (`x-sim-queue-ahead`).
    queue_ahead: Vec<u32>,
}

/// Sends completions with `headers` in a closed loop until `done` reaches `until`; counts its
/// successes in `ok`.
async fn closed_loop(
    url: String,
    headers: Vec<(&'static str, String)>,
    ok: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    until: usize,
) -> Seen {
    let c = client();
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while done.load(Ordering::Relaxed) < until && tokio::time::Instant::now() < deadline {
        let mut req = c
            .post(&url)
            .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 8}));
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let (status, ahead) = match req.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                let ahead: Option<u32> = r
                    .headers()
                    .get("x-sim-queue-ahead")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let _ = r.bytes().await;
                (s, ahead)
            }
            Err(_) => (0, None),
        };
        if status == 200 {
            ok.fetch_add(1, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
            seen.queue_ahead.extend(ahead);
        } else {
            seen.other.push(status);
        }
    }
    seen
}

#[tokio::test]
async fn two_flows_of_equal_priority_share_a_saturated_pool_equally() {
    let (_sim, _picker, envoy) = overloadable("flow_control: {enabled: true}\n").await;
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
        let other = c.await.unwrap().other;
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
    let (_sim, picker, envoy) = overloadable(
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
        let other = c.await.unwrap().other;
        assert!(
            other.is_empty(),
            "every priority request is served: {other:?}"
        );
    }
    // Stop the batch clients (they loop until this count).
    batch_done.store(stop_batch, Ordering::Relaxed);
    let mut shed = 0;
    for b in batch {
        let other = b.await.unwrap().other;
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
    let (sim, picker, envoy) = overloadable("flow_control: {enabled: true}\n").await;
    // Fill the server (two running, then the queue) with long requests straight to it.
    let background = common::long_streams(&sim, 0, MODEL, 3);
    until_saturated(&picker).await;
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

/// The 90th percentile of `v` (nearest rank).
fn p90(mut v: Vec<u32>) -> u32 {
    assert!(!v.is_empty());
    v.sort_unstable();
    v[(v.len() * 9).div_ceil(10) - 1]
}

/// Runs 8 batch (sheddable) and 2 chat (priority 0) closed-loop clients through `url` until
/// chat has 60 answers; returns what the chat and the batch clients saw.
async fn chat_beside_batch(url: &str) -> (Seen, Seen) {
    let done = Arc::new(AtomicUsize::new(0));
    let batch_done = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    // Far from overflowing when the clients that are still running add to it.
    let forever = usize::MAX / 2;
    let client = |objective: &str, done: &Arc<AtomicUsize>, until: usize| {
        tokio::spawn(closed_loop(
            url.to_string(),
            vec![("x-gateway-inference-objective", objective.to_string())],
            ok.clone(),
            done.clone(),
            until,
        ))
    };
    let batch: Vec<_> = (0..8)
        .map(|_| client("batch", &batch_done, forever))
        .collect();
    let chat: Vec<_> = (0..2).map(|_| client("standard", &done, 60)).collect();
    let mut chat_seen = Seen::default();
    for c in chat {
        let s = c.await.unwrap();
        chat_seen.other.extend(s.other);
        chat_seen.queue_ahead.extend(s.queue_ahead);
    }
    batch_done.store(forever, Ordering::Relaxed);
    let mut batch_seen = Seen::default();
    for b in batch {
        let s = b.await.unwrap();
        batch_seen.other.extend(s.other);
        batch_seen.queue_ahead.extend(s.queue_ahead);
    }
    (chat_seen, batch_seen)
}

#[tokio::test]
async fn priority_0_requests_find_the_queues_they_find_unloaded_while_sheddable_ones_are_shed() {
    // Time to first token follows the queue a request finds at the server (each request
    // ahead is a turn of prefill and decode before its own): the server reports it, so this
    // test reads queues, not clocks (speed itself is measured by the objectives benchmark).
    let (sim, picker, envoy) = overloadable(
        "objectives:\n  - {name: batch, pool: pool, priority: -1}\n  - {name: standard, pool: pool, priority: 0}\n",
    )
    .await;
    let url = envoy.url("/v1/completions");
    // Unloaded, a chat request finds nobody waiting.
    let (idle, _) = {
        let done = Arc::new(AtomicUsize::new(0));
        let s = closed_loop(
            url.clone(),
            vec![("x-gateway-inference-objective", "standard".into())],
            Arc::new(AtomicUsize::new(0)),
            done,
            10,
        )
        .await;
        (s, ())
    };
    assert_eq!(p90(idle.queue_ahead), 0);
    // Envoy alone, same load: everybody queues behind the batch work.
    let alone =
        envoy::in_front_of(Flavor::RoundRobin, BodyMode::FullDuplex, picker.grpc, &sim).await;
    let (chat, batch) = chat_beside_batch(&alone.url("/v1/completions")).await;
    assert!(chat.other.is_empty() && batch.other.is_empty());
    let alone_p90 = p90(chat.queue_ahead);
    assert!(
        alone_p90 >= 4,
        "Envoy alone: chat finds {alone_p90} waiting (p90)"
    );
    drop(alone);
    // fleetpick: batch is shed once a request waits (queue_threshold 1 in this fleet file), and
    // chat finds at most a request or two ahead.
    let (chat, batch) = chat_beside_batch(&url).await;
    assert!(
        chat.other.is_empty(),
        "every chat request served: {:?}",
        chat.other
    );
    assert!(
        !batch.other.is_empty() && batch.other.iter().all(|s| *s == 429),
        "batch shed with 429: {:?}",
        &batch.other[..batch.other.len().min(10)]
    );
    let fleetpick_p90 = p90(chat.queue_ahead);
    eprintln!(
        "chat's queue ahead, p90: {alone_p90} behind Envoy alone, {fleetpick_p90} with fleetpick"
    );
    assert!(
        fleetpick_p90 <= 2,
        "with fleetpick chat finds {fleetpick_p90} waiting (p90); Envoy alone {alone_p90}"
    );
}

#[tokio::test]
async fn requests_waiting_through_a_reload_are_placed_in_the_new_fleet() {
    let sim = Sim::start_with_config(
        &["--servers", "2", "--time-scale", "10"],
        "defaults: {max_num_seqs: 2}\n",
    )
    .await;
    let (a, b) = (&sim.entries[0], &sim.entries[1]);
    let extra = format!(
        "{POLL}imports: [{{pool: pool, policy: {{queue_threshold: 1}}}}]\nflow_control: {{enabled: true}}\n"
    );
    // fleetpick knows server A only, and A is full.
    let picker = Picker::start(&fleet_yaml(std::slice::from_ref(a), &extra)).await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let background = common::long_streams(&sim, 0, MODEL, 3);
    until_saturated(&picker).await;
    // Three requests wait in fleetpick's queue.
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let url = envoy.url("/v1/completions");
            tokio::spawn(async move { common::complete(&client(), &url, &[]).await })
        })
        .collect();
    wait_for("three requests queued", Duration::from_secs(20), || async {
        picker
            .metrics_page()
            .await
            .contains("fleetpick_flow_queue_length{pool=\"pool\",priority=\"0\"} 3")
            .then_some(())
    })
    .await;
    // The fleet file now names server B instead: the waiting requests go there, under the new
    // fleet, not to the full server of the old one.
    picker.rewrite_config(&fleet_yaml(std::slice::from_ref(b), &extra));
    for w in waiting {
        let (status, server) = w.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(server.as_deref(), Some(b.name.as_str()));
    }
    for t in background {
        t.abort();
    }
}
