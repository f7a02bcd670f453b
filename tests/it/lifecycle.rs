//! fleetpick's life as a process beside Envoy: liveness and readiness over HTTP, and a SIGTERM
//! during traffic that lets open requests finish and exits 0.

use fleetpick_tests as common;

use std::time::Duration;

use common::envoy;
use common::{MODEL, Picker, Sim, client, fleet_yaml, wait_for};
use fleetpick_envoy::{BodyMode, Flavor};
use serde_json::json;

const POLL: &str = "poller: {interval_ms: 20, stale_after_ms: 2000, backoff_max_ms: 200}\n";

async fn status_of(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn sigterm_during_traffic_finishes_open_requests_and_exits_0() {
    let sim = Sim::start(&["--servers", "1", "--time-scale", "10"]).await;
    let mut picker = Picker::start(&fleet_yaml(
        &sim.entries,
        &format!("{POLL}server: {{shutdown_grace_ms: 30000}}\n"),
    ))
    .await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    let healthz = format!("http://{}/healthz", picker.metrics);
    let readyz = format!("http://{}/readyz", picker.metrics);
    assert_eq!(status_of(&healthz).await, 200);
    wait_for("ready", Duration::from_secs(20), || async {
        (status_of(&readyz).await == 200).then_some(())
    })
    .await;
    // The image's health check (no curl in it): `fleetpick probe`.
    let probe = |url: &str| {
        std::process::Command::new(common::bin("fleetpick"))
            .args(["probe", url])
            .output()
            .unwrap()
    };
    assert!(probe(&readyz).status.success());
    envoy::until_routing(&envoy).await;
    let url = envoy.url("/v1/completions");
    // A long streamed completion, under way when the signal comes.
    let mut resp = client()
        .post(&url)
        .json(&json!({"model": MODEL, "prompt": "tell me everything", "max_tokens": 1200, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.chunk().await.unwrap().unwrap().to_vec();
    let pid = picker.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    // Not ready from now on (Kubernetes and Envoy's health check stop sending), still live.
    wait_for(
        "not ready after SIGTERM",
        Duration::from_secs(10),
        || async { (status_of(&readyz).await == 503).then_some(()) },
    )
    .await;
    let refused = probe(&readyz);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // The open request runs to its end.
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let tokens = text.lines().filter(|l| l.starts_with("data: {")).count();
    assert!(tokens >= 1200, "every token arrived: {tokens}");
    // Then the process exits, successfully, well before the grace runs out.
    let status = wait_for("fleetpick to exit", Duration::from_secs(20), || {
        let exited = picker.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status {status}");
}

/// The metric names the README documents (its metrics table).
fn documented_metrics() -> Vec<String> {
    let readme = std::fs::read_to_string(common::repo("README.md")).unwrap();
    let names: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split(['`', '{']).next())
        .filter(|n| n.starts_with("fleetpick_") || n.starts_with("inference_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 15, "the README's metrics table: {names:?}");
    names
}

#[tokio::test]
async fn every_documented_metric_appears_after_traffic() {
    let sim = Sim::start(&["--servers", "2", "--time-scale", "20"]).await;
    let picker = Picker::start(&fleet_yaml(
        &sim.entries,
        &format!(
            "{POLL}flow_control: {{enabled: true}}\nobjectives: [{{name: batch, pool: pool, priority: -1}}]\nimports: [{{pool: pool, policy: {{dry_run: true}}}}]\n"
        ),
    ))
    .await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let url = envoy.url("/v1/completions");
    for _ in 0..5 {
        let r = client()
            .post(&url)
            .json(&json!({"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    // A refusal, for the error counters.
    let r = client()
        .post(&url)
        .json(&json!({"prompt": "no model"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The fleet file changes its policy: a reload is counted.
    picker.rewrite_config(&fleet_yaml(
        &sim.entries,
        &format!(
            "{POLL}flow_control: {{enabled: true}}\nobjectives: [{{name: batch, pool: pool, priority: -1}}]\nimports: [{{pool: pool, policy: {{dry_run: false}}}}]\n"
        ),
    ));
    wait_for("the reload counted", Duration::from_secs(20), || async {
        picker
            .metrics_page()
            .await
            .contains("fleetpick_config_reloads_total{result=\"applied\"} 1")
            .then_some(())
    })
    .await;
    let page = picker.metrics_page().await;
    let missing: Vec<String> = documented_metrics()
        .into_iter()
        .filter(|name| !page.lines().any(|l| l.starts_with(name.as_str())))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but absent: {missing:?}\n{page}"
    );
    // Every request counted once, where it ended and how: six served (the first one that
    // found Envoy routing, then five), one refused.
    let served = format!(
        "fleetpick_requests_total{{model=\"{MODEL}\",objective=\"\",cluster=\"local\",status=\"200\"}} 6"
    );
    assert!(page.contains(&served), "{served}\n{page}");
    let refused =
        "fleetpick_requests_total{model=\"\",objective=\"\",cluster=\"\",status=\"400\"} 1";
    assert!(page.contains(refused), "{refused}\n{page}");
    // One time per output token for each streamed response, none for the others.
    assert!(
        page.contains("fleetpick_time_per_output_token_seconds_count{pool=\"pool\"} 5"),
        "{page}"
    );
}

/// What the clients saw: (status, the server that answered), in order.
type Seen = std::sync::Arc<parking_lot::Mutex<Vec<(u16, Option<String>)>>>;

/// One client sending completions back to back through `url` until `stop` (at most 3,000, at
/// most 120 s), recording each (status, server).
fn traffic(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: Seen,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        let began = std::time::Instant::now();
        for _ in 0..3000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed)
                || began.elapsed() > Duration::from_secs(120)
            {
                break;
            }
            let r = common::complete(&c, &url, &[]).await;
            seen.lock().push(r);
        }
    })
}

#[tokio::test]
async fn reload_swaps_endpoints_and_refuses_a_bad_file_while_traffic_flows() {
    use parking_lot::Mutex;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let sim = Sim::start(&["--servers", "3", "--time-scale", "20"]).await;
    let (a, b, c) = (&sim.entries[0], &sim.entries[1], &sim.entries[2]);
    let picker = Picker::start(&fleet_yaml(&[a.clone(), b.clone()], POLL)).await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| traffic(envoy.url("/v1/completions"), stop.clone(), seen.clone()))
        .collect();
    let served_by = |name: &str, from: usize| {
        let seen = seen.lock();
        seen[from.min(seen.len())..]
            .iter()
            .filter(|(_, s)| s.as_deref() == Some(name))
            .count()
    };
    wait_for(
        "traffic on both first endpoints",
        Duration::from_secs(30),
        || async { (served_by(&a.name, 0) > 0 && served_by(&b.name, 0) > 0).then_some(()) },
    )
    .await;

    // C joins and A leaves, in one valid change.
    picker.rewrite_config(&fleet_yaml(&[b.clone(), c.clone()], POLL));
    wait_for("the reload applied", Duration::from_secs(20), || async {
        let page = picker.metrics_page().await;
        (common::metric(&page, "fleetpick_config_reloads_total{result=\"applied\"}") == Some(1.0))
            .then_some(())
    })
    .await;
    let after_reload = seen.lock().len();
    wait_for(
        "requests on the endpoint that joined",
        Duration::from_secs(30),
        || async { (served_by(&c.name, after_reload) >= 5).then_some(()) },
    )
    .await;

    // A file that does not validate: refused, the last good fleet stays.
    std::fs::write(
        &picker.config,
        "clusters: [{name: a}]\npools: [{name: p, models: [m]}]\n",
    )
    .unwrap();
    let refused = |n: f64| {
        let picker = &picker;
        async move {
            let page = picker.metrics_page().await;
            (common::metric(&page, "fleetpick_config_reloads_total{result=\"refused\"}") == Some(n))
                .then_some(())
        }
    };
    wait_for("the bad file refused", Duration::from_secs(20), || {
        refused(1.0)
    })
    .await;
    // SIGHUP re-reads at once, and reports the refusal again.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &picker.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for(
        "the bad file refused again on SIGHUP",
        Duration::from_secs(20),
        || refused(2.0),
    )
    .await;
    let after_refusal = seen.lock().len();
    wait_for(
        "traffic after the refusal",
        Duration::from_secs(30),
        || async { (seen.lock().len() >= after_refusal + 40).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }

    let seen = seen.lock().clone();
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    // After the reload had settled, nothing went to the endpoint that left; the bad file
    // changed nothing.
    let settled = after_reload + 20;
    assert_eq!(served_by_in(&seen[settled..], &a.name), 0);
    assert!(served_by_in(&seen[after_refusal..], &c.name) > 0);
    assert!(served_by_in(&seen[after_refusal..], &b.name) > 0);
    // No in-flight count lost or leaked: every endpoint of the fleet is back at 0, and the one
    // that left is no longer reported.
    let page = picker.metrics_page().await;
    for e in [b, c] {
        let series = format!(
            "fleetpick_endpoint_in_flight{{pool=\"pool\",cluster=\"{}\",endpoint=\"{}\"}}",
            e.cluster, e.address
        );
        assert_eq!(
            common::metric(&page, &series),
            Some(0.0),
            "{series}\n{page}"
        );
    }
    assert!(
        !page.contains(&format!("endpoint=\"{}\"", a.address)),
        "{page}"
    );
}

fn served_by_in(seen: &[(u16, Option<String>)], name: &str) -> usize {
    seen.iter()
        .filter(|(_, s)| s.as_deref() == Some(name))
        .count()
}
