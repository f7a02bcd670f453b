//! Many clusters, one picker, end to end through the real Envoy and the simulator: locality,
//! bursting past local capacity under an in-flight cap, the loss and return of a whole cluster
//! (with and without Envoy's fallbacks), draining a cluster by reloading its policy, and a
//! dry-run policy that only reports.
//!
//! Every fleet here has two clusters: `near` in region r1 (the picker's) and `far` in r2.

use fleetpick_tests as common;

use std::time::{Duration, Instant};

use common::envoy::{self, Envoy};
use common::{MODEL, Picker, Sim, client, complete, wait_for};
use fleetpick_envoy::{BodyMode, Flavor};
use serde_json::json;

const POLL: &str = "poller: {interval_ms: 50, stale_after_ms: 2000, backoff_max_ms: 200}\n";

/// The fleet file for `sim` (clusters `near` and `far`), for a picker in r1, plus `extra`.
fn fleet(sim: &Sim, extra: &str) -> String {
    fleetpick_sim::fleet::fleet_file(
        &sim.entries,
        MODEL,
        &[("near", "r1"), ("far", "r2")],
        &format!("picker: {{region: r1}}\n{POLL}{extra}"),
    )
}

async fn two_clusters(servers: &str, time_scale: &str, sim_config: Option<&str>) -> Sim {
    let args = vec![
        "--servers",
        servers,
        "--clusters",
        "near,far",
        "--time-scale",
        time_scale,
    ];
    match sim_config {
        Some(text) => Sim::start_with_config(&args, text).await,
        None => Sim::start(&args).await,
    }
}

async fn envoy_for(flavor: Flavor, picker: &Picker, sim: &Sim) -> Envoy {
    let envoy = envoy::in_front_of(flavor, BodyMode::FullDuplex, picker.grpc, sim).await;
    let url = envoy.url("/v1/completions");
    // A request routed by fleetpick, not merely through Envoy: the fallback configuration
    // fails open to round robin until its health check has seen fleetpick serving.
    wait_for(
        "a first request routed by fleetpick",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                let routed = complete(&client(), &url, &[]).await.0 == 200;
                let picked = sum(&picker.metrics_page().await, "fleetpick_picks_total", &[]) > 0.0;
                (routed && picked).then_some(())
            }
        },
    )
    .await;
    envoy
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn sum(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn cluster_of(server: &str) -> &str {
    server.rsplit_once('-').map_or(server, |(c, _)| c)
}

#[tokio::test]
async fn at_low_load_every_request_stays_in_the_local_region() {
    let sim = two_clusters("4", "10", None).await;
    let picker = Picker::start(&fleet(&sim, "")).await;
    let envoy = envoy_for(Flavor::OriginalDst, &picker, &sim).await;
    every_endpoint_fresh(&picker, &sim).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    let before = picker.metrics_page().await;
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200);
        let server = server.unwrap();
        assert_eq!(cluster_of(&server), "near", "{server} is not local");
        servers.insert(server);
    }
    // Both local servers share the load; the remote region gets nothing.
    assert_eq!(servers.len(), 2, "{servers:?}");
    let page = picker.metrics_page().await;
    let picks = |page: &str, labels: &[&str]| sum(page, "fleetpick_picks_total", labels);
    let local = ["cluster=\"near\"", "tier=\"local\""];
    assert_eq!(
        picks(&page, &local) - picks(&before, &local),
        30.0,
        "{page}"
    );
    let far = ["cluster=\"far\""];
    assert_eq!(picks(&page, &far) - picks(&before, &far), 0.0, "{page}");
}

/// Waits until fleetpick has fresh metrics from every server (no endpoint of either cluster
/// starts the test unscraped).
async fn every_endpoint_fresh(picker: &Picker, sim: &Sim) {
    wait_for(
        "every endpoint scraped",
        Duration::from_secs(30),
        || async {
            let page = picker.metrics_page().await;
            let health = |c: &str| {
                sum(
                    &page,
                    "fleetpick_cluster_health",
                    &[&format!("cluster=\"{c}\""), "health=\"up\""],
                )
            };
            (health("near") == 1.0 && health("far") == 1.0).then_some(())
        },
    )
    .await;
    let _ = sim;
}

#[tokio::test]
async fn a_burst_past_local_capacity_spills_remote_and_never_passes_the_in_flight_cap() {
    // Slow decoding (time scale 1, 200 tokens: several seconds), so that the whole burst is in
    // flight at once.
    let sim = two_clusters("4", "1", Some("defaults:\n  max_num_seqs: 4\n")).await;
    let policy = "imports:\n  - pool: pool\n    policy: {balancing: in-flight, max_in_flight_per_endpoint: 3}\n";
    let picker = Picker::start(&fleet(&sim, policy)).await;
    let envoy = envoy_for(Flavor::OriginalDst, &picker, &sim).await;
    let url = envoy.url("/v1/completions");
    let picks_before = sum(&picker.metrics_page().await, "fleetpick_picks_total", &[]);
    // Streams far longer than the test (4,000 tokens at time scale 1: over 100 s), held open
    // until the checks are done, so no slot frees up by chance on a slow machine.
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                client()
                    .post(url)
                    .json(&json!({"model": MODEL, "prompt": format!("burst {i}"), "max_tokens": 4000, "stream": true}))
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Every request of the burst picked: the fleet is exactly full (4 endpoints x 3).
    wait_for("the burst to be picked", Duration::from_secs(30), || {
        let picker = &picker;
        async move {
            let page = picker.metrics_page().await;
            (sum(&page, "fleetpick_picks_total", &[]) - picks_before >= 12.0).then_some(())
        }
    })
    .await;
    let page = picker.metrics_page().await;
    for e in &sim.entries {
        let n = sum(
            &page,
            "fleetpick_endpoint_in_flight",
            &[&format!("endpoint=\"{}\"", e.address)],
        );
        assert_eq!(n, 3.0, "{} has {n} in flight\n{page}", e.name);
    }
    // One more is refused with 429, in the OpenAI error shape, with a retry hint.
    let resp = client()
        .post(&url)
        .json(&json!({"model": MODEL, "prompt": "one too many", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["x-fleetpick-reason"], "at-capacity");
    assert_eq!(resp.headers()["retry-after"], "1");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_in_flight_per_endpoint"),
        "{err}"
    );
    let mut per_server = std::collections::BTreeMap::new();
    let mut streams = Vec::new();
    for task in burst {
        let mut resp = task.await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let server = resp.headers()["x-sim-server"].to_str().unwrap().to_string();
        *per_server.entry(server).or_insert(0) += 1;
        // Tokens are flowing.
        assert!(resp.chunk().await.unwrap().is_some());
        streams.push(resp);
    }
    // The local region filled first and the excess went remote; nobody took more than three.
    assert_eq!(per_server.len(), 4, "{per_server:?}");
    assert!(per_server.values().all(|&n| n == 3), "{per_server:?}");
    let page = picker.metrics_page().await;
    assert_eq!(
        sum(
            &page,
            "fleetpick_picks_total",
            &["cluster=\"far\"", "tier=\"spill\""]
        ),
        6.0,
        "{page}"
    );
    // Clients leave: every count is released with its stream.
    drop(streams);
    wait_for(
        "every in-flight count released",
        Duration::from_secs(30),
        || async {
            let page = picker.metrics_page().await;
            (sum(&page, "fleetpick_endpoint_in_flight", &[]) == 0.0).then_some(())
        },
    )
    .await;
}

/// Stops the `near` cluster while requests are in flight there, then sends requests one after
/// another through `envoy` until 20 have been served by `far` past the first second. Returns the
/// errors seen (status, when, Envoy's or fleetpick's words), those of the requests in flight at
/// the stop first, at zero.
async fn through_the_loss_of_near(
    sim: &Sim,
    picker: &Picker,
    envoy: &Envoy,
) -> Vec<(u16, Duration, String)> {
    let c = client();
    let url = envoy.url("/v1/completions");
    let send = |c: reqwest::Client, url: String, max_tokens: u32| async move {
        let resp = c
            .post(&url)
            .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let server = resp
            .headers()
            .get("x-sim-server")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap_or_default();
        (status, server, text)
    };
    // Requests in flight at near when it goes (non-streamed, 1,000 tokens: seconds).
    let busy: Vec<_> = (0..4)
        .map(|_| tokio::spawn(send(client(), url.clone(), 1000)))
        .collect();
    wait_for(
        "requests in flight at near",
        Duration::from_secs(20),
        || async {
            let page = picker.metrics_page().await;
            (sum(&page, "fleetpick_endpoint_in_flight", &["cluster=\"near\""]) >= 4.0).then_some(())
        },
    )
    .await;
    c.post(sim.admin_url("/clusters/near/stop"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let stopped = Instant::now();
    let mut errors = Vec::new();
    for b in busy {
        let (status, _, text) = b.await.unwrap();
        if status != 200 {
            errors.push((status, Duration::ZERO, text));
        }
    }
    let mut ok_far_after_window = 0;
    let deadline = stopped + Duration::from_secs(30);
    while ok_far_after_window < 20 {
        assert!(
            Instant::now() < deadline,
            "too slow to get 20 requests through"
        );
        let (status, server, text) = send(c.clone(), url.clone(), 2).await;
        if status != 200 {
            errors.push((status, stopped.elapsed(), text));
        } else if stopped.elapsed() > Duration::from_secs(1) {
            assert_eq!(cluster_of(&server.unwrap()), "far");
            ok_far_after_window += 1;
        }
    }
    errors
}

/// Envoy's count of retries to the model servers.
async fn envoy_retries(envoy: &Envoy) -> f64 {
    let text = common::get_text(
        &envoy.admin_url("/stats?filter=cluster.model_servers.upstream_rq_retry$"),
    )
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix("cluster.model_servers.upstream_rq_retry: "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn losing_a_cluster_without_fallbacks_errors_stop_within_a_second_and_it_comes_back() {
    let sim = two_clusters("4", "10", None).await;
    let picker = Picker::start(&fleet(&sim, "scheduler: {cluster_recovery_ms: 500}\n")).await;
    let envoy = envoy_for(Flavor::OriginalDst, &picker, &sim).await;
    let errors = through_the_loss_of_near(&sim, &picker, &envoy).await;
    // Without retries, the requests running at near when it went are lost.
    assert!(!errors.is_empty(), "the lost requests were not seen");
    assert!(
        errors
            .iter()
            .all(|(_, at, _)| *at <= Duration::from_secs(1)),
        "errors past the first second: {errors:?}"
    );
    let page = picker.metrics_page().await;
    assert_eq!(
        sum(
            &page,
            "fleetpick_cluster_health",
            &["cluster=\"near\"", "health=\"down\""]
        ),
        1.0,
        "{page}"
    );
    // Back: after its recovery time, local traffic returns to it on its own.
    client()
        .post(sim.admin_url("/clusters/near/start"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let url = envoy.url("/v1/completions");
    wait_for(
        "local traffic back in near",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let (status, server) = complete(&client(), &url, &[]).await;
                (status == 200 && cluster_of(&server?) == "near").then_some(())
            }
        },
    )
    .await;
    let page = picker.metrics_page().await;
    assert_eq!(
        sum(
            &page,
            "fleetpick_cluster_health",
            &["cluster=\"near\"", "health=\"up\""]
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test]
async fn losing_a_cluster_with_fallbacks_no_client_sees_an_error() {
    let sim = two_clusters("4", "10", None).await;
    let picker = Picker::start(&fleet(&sim, "scheduler: {fallbacks: 1}\n")).await;
    let envoy = envoy_for(Flavor::Fallback, &picker, &sim).await;
    let errors = through_the_loss_of_near(&sim, &picker, &envoy).await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    // They were saved by retries down fleetpick's list, into the other cluster.
    assert!(envoy_retries(&envoy).await >= 4.0);
}

#[tokio::test]
async fn capacity_scaler_zero_drains_a_cluster_while_its_requests_finish() {
    let sim = two_clusters("4", "1", None).await;
    let picker = Picker::start(&fleet(&sim, "")).await;
    let envoy = envoy_for(Flavor::OriginalDst, &picker, &sim).await;
    let url = envoy.url("/v1/completions");
    // Long requests in flight at the local cluster (low load: all go local).
    let long: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = client()
                    .post(url)
                    .json(&json!({"model": MODEL, "prompt": format!("long {i}"), "max_tokens": 800, "stream": true}))
                    .send()
                    .await
                    .unwrap();
                let server = resp.headers()["x-sim-server"].to_str().unwrap().to_string();
                let body = resp.text().await.unwrap();
                (server, body.contains("[DONE]"))
            })
        })
        .collect();
    let page_has = |page: &str| sum(page, "fleetpick_endpoint_in_flight", &["cluster=\"near\""]);
    wait_for(
        "the long requests in flight",
        Duration::from_secs(20),
        || {
            let picker = &picker;
            async move { (page_has(&picker.metrics_page().await) >= 3.0).then_some(()) }
        },
    )
    .await;
    picker.rewrite_config(&fleet(
        &sim,
        "imports:\n  - pool: pool\n    policy:\n      scopes:\n        - {match_labels: {site: near}, capacity_scaler: 0}\n",
    ));
    wait_for("the policy reloaded", Duration::from_secs(20), || {
        let picker = &picker;
        async move {
            let page = picker.metrics_page().await;
            (sum(
                &page,
                "fleetpick_config_reloads_total",
                &["result=\"applied\""],
            ) >= 1.0)
                .then_some(())
        }
    })
    .await;
    // New requests go remote, while the drained cluster's requests are still running.
    let c = client();
    for _ in 0..10 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(cluster_of(&server.unwrap()), "far");
    }
    let page = picker.metrics_page().await;
    assert!(
        page_has(&page) >= 1.0,
        "the drained requests ended too soon to show a drain"
    );
    for task in long {
        let (server, done) = task.await.unwrap();
        assert_eq!(cluster_of(&server), "near");
        assert!(done, "a drained request did not finish");
    }
    assert_eq!(page_has(&picker.metrics_page().await), 0.0);
}

#[tokio::test]
async fn a_dry_run_policy_changes_nothing_but_reports() {
    let sim = two_clusters("4", "10", None).await;
    let picker = Picker::start(&fleet(
        &sim,
        "imports:\n  - pool: pool\n    policy:\n      dry_run: true\n      scopes:\n        - {match_labels: {site: near}, capacity_scaler: 0}\n",
    ))
    .await;
    let envoy = envoy_for(Flavor::OriginalDst, &picker, &sim).await;
    let c = client();
    let url = envoy.url("/v1/completions");
    let before = sum(
        &picker.metrics_page().await,
        "fleetpick_dry_run_verdicts_total",
        &["cluster=\"near\"", "verdict=\"drained\""],
    );
    for _ in 0..20 {
        let (status, server) = complete(&c, &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(
            cluster_of(&server.unwrap()),
            "near",
            "the dry run moved traffic"
        );
    }
    let page = picker.metrics_page().await;
    assert_eq!(
        sum(
            &page,
            "fleetpick_dry_run_verdicts_total",
            &["cluster=\"near\"", "verdict=\"drained\""]
        ) - before,
        20.0,
        "{page}"
    );
}
