//! End to end through the real Envoy: client -> Envoy -> (ext_proc) fleetpick -> Envoy ->
//! simulated model server, every part its own process on loopback.

use fleetpick_tests as common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::envoy::{self, Envoy};
use common::{MODEL, Picker, Sim, client, complete, fleet_yaml, get_text, metric, wait_for};
use fleetpick_envoy::{BodyMode, EnvoyParams, Flavor, render};
use serde_json::json;

const FAST_POLL: &str = "poller: {interval_ms: 50, stale_after_ms: 2000, backoff_max_ms: 200}\n";

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn envoy_for(flavor: Flavor, picker: SocketAddr, sim: &Sim) -> Envoy {
    envoy::in_front_of(flavor, BodyMode::FullDuplex, picker, sim).await
}

#[tokio::test]
async fn requests_land_on_the_least_loaded_endpoint() {
    let sim = Sim::start_with_config(&["--servers", "3"], "defaults:\n  max_num_seqs: 2\n").await;
    // Servers 0 and 1 get long requests straight from a client: two run, four wait, each.
    let background: Vec<_> = (0..2)
        .flat_map(|i| common::long_streams(&sim, i, MODEL, 6))
        .collect();
    for i in 0..2 {
        let url = sim.url(i, "/metrics");
        wait_for(
            "queues on the busy servers",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                async move {
                    (metric(&get_text(&url).await, "vllm:num_requests_waiting")? >= 4.0)
                        .then_some(())
                }
            },
        )
        .await;
    }
    // The picker starts with the load already visible.
    let picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    let envoy = envoy_for(Flavor::OriginalDst, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    for _ in 0..20 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(
            server.as_deref(),
            Some(sim.entries[2].name.as_str()),
            "the idle server takes every request"
        );
    }
    for b in background {
        b.abort();
    }
}

#[tokio::test]
async fn an_endpoint_reporting_kv_095_gets_nothing_while_others_are_idle() {
    let sim = Sim::start(&["--servers", "3", "--time-scale", "10"]).await;
    let c = client();
    c.post(sim.admin_url("/servers/local-0/faults"))
        .json(&json!({"kv_usage_override": 0.95}))
        .send()
        .await
        .unwrap();
    let picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    let envoy = envoy_for(Flavor::OriginalDst, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let url = envoy.url("/v1/completions");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200);
        *seen.entry(server.unwrap()).or_insert(0) += 1;
    }
    assert!(!seen.contains_key("local-0"), "{seen:?}");
    // The two idle servers share the traffic (random tie-break, not turn order).
    assert!(
        seen.get("local-1").copied().unwrap_or(0) >= 5
            && seen.get("local-2").copied().unwrap_or(0) >= 5,
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_client_sent_destination_header_is_ignored() {
    let sim = Sim::start(&["--servers", "3", "--time-scale", "10"]).await;
    // The fleet file knows servers 0 and 1; the client asks for server 2.
    let picker = Picker::start(&fleet_yaml(&sim.entries[..2], FAST_POLL)).await;
    let envoy = envoy_for(Flavor::OriginalDst, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    let forged = sim.entries[2].address.clone();
    for _ in 0..20 {
        let (status, server) = complete(
            &c,
            &url,
            &[("x-gateway-destination-endpoint", forged.as_str())],
        )
        .await;
        assert_eq!(status, 200);
        assert_ne!(server.as_deref(), Some(sim.entries[2].name.as_str()));
    }
}

/// The `traceparent` the model server received for one completion through `url` sent with
/// `traceparent` (if any) and `tracestate: vendor=1`, and whether the `tracestate` reached it.
async fn traceparent_upstream(url: &str, traceparent: Option<&str>) -> (String, bool) {
    let mut req = client()
        .post(url)
        .header("tracestate", "vendor=1")
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}));
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let state = h
        .get("x-sim-tracestate")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        state.is_none() || state.as_deref() == Some("vendor=1"),
        "{state:?}"
    );
    (
        h.get("x-sim-traceparent")
            .expect("the model server got a traceparent")
            .to_str()
            .unwrap()
            .to_string(),
        state.is_some(),
    )
}

#[tokio::test]
async fn the_pick_is_a_span_of_the_request_trace_in_both_body_modes() {
    let sim = Sim::start(&["--servers", "2", "--time-scale", "20"]).await;
    let picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for mode in [BodyMode::FullDuplex, BodyMode::Buffered] {
        let envoy = envoy::in_front_of(Flavor::OriginalDst, mode, picker.grpc, &sim).await;
        envoy::until_routing(&envoy).await;
        let url = envoy.url("/v1/completions");
        // The same trace and sampling decision, a new parent: fleetpick's span; the vendors'
        // tracestate goes along.
        let (got, state) = traceparent_upstream(&url, Some(sent)).await;
        assert!(state, "{mode}: tracestate passed on");
        assert_eq!(got.len(), 55, "{mode}: {got}");
        assert_eq!(&got[..36], &sent[..36], "{mode}: {got}");
        assert_ne!(&got[36..52], &sent[36..52], "{mode}: {got}");
        assert_eq!(&got[52..], "-01", "{mode}: {got}");
        // Every request's pick is its own span.
        let (again, _) = traceparent_upstream(&url, Some(sent)).await;
        assert_ne!(&again[36..52], &got[36..52], "{mode}");
        // None sent, or an invalid one: a new trace, not sampled, without the orphaned
        // tracestate.
        for sent in [None, Some("00-XYZ-bad-01")] {
            let (got, state) = traceparent_upstream(&url, sent).await;
            assert!(!state, "{mode}: an orphaned tracestate passed on");
            let parsed = fleetpick::trace::TraceContext::parse(&got).expect("a valid traceparent");
            assert_eq!(parsed.flags, 0, "{mode}: {got}");
            assert!(!got.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        }
    }
}

#[tokio::test]
async fn a_stopped_endpoint_leaves_within_a_second() {
    let sim = Sim::start(&["--servers", "3", "--time-scale", "10"]).await;
    let picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    let envoy = envoy_for(Flavor::OriginalDst, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    c.post(sim.admin_url("/servers/local-1/stop"))
        .send()
        .await
        .unwrap();
    let stopped = Instant::now();
    let mut last_error = None;
    let mut ok_after_window = 0;
    let deadline = stopped + Duration::from_secs(20);
    // Requests one after another until 30 have succeeded past the one-second window.
    while ok_after_window < 30 {
        assert!(
            Instant::now() < deadline,
            "too slow to get 30 requests through"
        );
        let (status, server) = complete(&c, &url, &[]).await;
        let at = stopped.elapsed();
        if status == 200 {
            assert_ne!(server.as_deref(), Some("local-1"));
            if at > Duration::from_secs(1) {
                ok_after_window += 1;
            }
        } else {
            last_error = Some(at);
            assert!(
                at <= Duration::from_secs(1),
                "error {status} {at:?} after the stop"
            );
        }
    }
    eprintln!("last error {last_error:?} after the stop");
    // fleetpick's own view of it: failing scrapes, aging data, one endpoint fewer ready.
    let stopped_addr = &sim.entries[1].address;
    let page = picker.metrics_page().await;
    let sample = |name: &str| {
        page.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("endpoint=\"{stopped_addr}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} for {stopped_addr}: {page}"))
    };
    assert!(
        sample("fleetpick_endpoint_scrape_failures") >= 1.0,
        "{page}"
    );
    assert!(
        sample("fleetpick_endpoint_data_age_seconds") > 0.5,
        "{page}"
    );
    assert!(
        page.contains("fleetpick_cluster_ready_endpoints{pool=\"pool\",cluster=\"local\"} 2"),
        "{page}"
    );
}

#[tokio::test]
async fn fallback_config_keeps_serving_while_fleetpick_is_down() {
    let sim = Sim::start(&["--servers", "2", "--time-scale", "10"]).await;
    let mut picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    let envoy = envoy_for(Flavor::Fallback, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    picker.kill();
    // Envoy's active health check marks the picker down; from then on it fails open.
    let clusters = envoy.admin_url("/clusters");
    wait_for(
        "Envoy to see the picker unhealthy",
        Duration::from_secs(30),
        || {
            let clusters = clusters.clone();
            async move {
                let text = client()
                    .get(&clusters)
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                text.lines()
                    .any(|l| {
                        l.starts_with("fleetpick::")
                            && l.contains("health_flags::/failed_active_hc")
                    })
                    .then_some(())
            }
        },
    )
    .await;
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200, "a request failed while fleetpick was down");
        servers.insert(server.unwrap());
    }
    assert_eq!(
        servers.len(),
        2,
        "round robin over both servers: {servers:?}"
    );
}

#[tokio::test]
async fn in_flight_lasts_as_long_as_the_response_through_envoy() {
    use futures_util::StreamExt;
    use std::sync::atomic::Ordering;
    let sim = Sim::start(&["--servers", "1"]).await;
    // The picker in this process, so the test can read its in-flight count.
    let cfg =
        fleetpick_config::FleetConfig::parse(&fleet_yaml(&sim.entries, FAST_POLL), "t").unwrap();
    let running = fleetpick::InProcess::start(cfg).unwrap();
    let (picker, fleet) = (running.addr, running.fleet.clone());
    let envoy = envoy_for(Flavor::OriginalDst, picker, &sim).await;
    envoy::until_routing(&envoy).await;
    let in_flight = || fleet.endpoints[0].in_flight.load(Ordering::Relaxed);
    wait_for(
        "the first request released",
        Duration::from_secs(10),
        || async { (in_flight() == 0).then_some(()) },
    )
    .await;

    // A streamed completion holds its count while tokens flow (25 ms a token), and releases it
    // at the end of the response.
    let c = client();
    let url = envoy.url("/v1/completions");
    let body =
        json!({"model": MODEL, "prompt": "count to forty", "max_tokens": 40, "stream": true});
    let resp = c.post(&url).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    assert!(stream.next().await.unwrap().is_ok());
    assert_eq!(in_flight(), 1, "held while the response streams");
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    wait_for(
        "release at the end of the response",
        Duration::from_secs(10),
        || async { (in_flight() == 0).then_some(()) },
    )
    .await;

    // A client that leaves mid-stream releases it too.
    let body = json!({"model": MODEL, "prompt": "count to a thousand", "max_tokens": 1000, "stream": true});
    let resp = c.post(&url).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    assert!(stream.next().await.unwrap().is_ok());
    assert_eq!(in_flight(), 1);
    drop(stream);
    wait_for(
        "release after the client left",
        Duration::from_secs(10),
        || async { (in_flight() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn large_bodies_arrive_intact_in_both_body_modes() {
    let sim = Sim::start_with_config(
        &["--servers", "2", "--time-scale", "200"],
        "defaults:\n  num_blocks: 8192\n  max_model_len: 65536\n",
    )
    .await;
    let picker = Picker::start(&fleet_yaml(&sim.entries, FAST_POLL)).await;
    for mode in [BodyMode::FullDuplex, BodyMode::Buffered] {
        let params = EnvoyParams {
            listen: loopback0(),
            admin: loopback0(),
            extproc: picker.grpc,
            endpoints: Vec::new(),
            body_mode: mode,
            localities: Vec::new(),
            extproc_tls: None,
        };
        let envoy = envoy::start(&render(Flavor::OriginalDst, &params)).await;
        envoy::until_routing(&envoy).await;
        // 200,000 bytes of prompt: 47,580 tokens by the simulator's tokenizer, so the usage it
        // reports shows the whole body arrived (a lost or repeated piece changes the count).
        let prompt = fleetpick_loadgen::filler_text(11, 200_000);
        let resp = client()
            .post(envoy.url("/v1/chat/completions"))
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{mode:?}");
        let v: serde_json::Value = resp.json().await.unwrap();
        // The chat template adds 11: <|begin_of_text|>, the user header and its blank line (4),
        // <|eot_id|>, the assistant header and its blank line (5: "assistant" is two tokens).
        assert_eq!(v["usage"]["prompt_tokens"], 47_580 + 11, "{mode:?}");
        // And a bad body is refused by fleetpick in the OpenAI shape, through Envoy.
        let resp = client()
            .post(envoy.url("/v1/completions"))
            .header("content-type", "application/json")
            .body("{\"prompt\": \"no model\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{mode:?}");
        assert_eq!(resp.headers()["x-fleetpick-reason"], "bad-request");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "model");
    }
}
