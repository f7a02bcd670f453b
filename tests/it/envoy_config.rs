//! The Envoy configurations of `fleetpick_envoy` against the real Envoy: every flavor validates,
//! the checked-in `envoy/*.yaml` are exactly what the code renders, and the configurations
//! route real requests to a simulated fleet.
//!
//! After changing `crates/envoy/src/lib.rs`, regenerate the checked-in files with
//! `FLEETPICK_BLESS=1 cargo test --test integration envoy_config`.
// The helpers below are test code too.

use fleetpick_tests as common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use common::envoy::{self, Envoy, validate};
use common::{MODEL, Sim, client};
use fleetpick_envoy::{
    BodyMode, DESTINATION_HEADER, EnvoyParams, Flavor, MODEL_CLUSTER, render, user_defaults,
};
use serde_json::json;

/// Parameters for a test Envoy: loopback, kernel-chosen ports, the given model servers.
fn test_params(extproc: SocketAddr, endpoints: Vec<SocketAddr>) -> EnvoyParams {
    EnvoyParams {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        extproc,
        endpoints,
        body_mode: BodyMode::FullDuplex,
        localities: Vec::new(),
        extproc_tls: None,
    }
}

/// An address nothing listens on (bound once by us, then released).
fn dead_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sim_endpoints(sim: &Sim) -> Vec<SocketAddr> {
    sim.entries
        .iter()
        .map(|e| e.address.parse().unwrap())
        .collect()
}

fn sim_names(sim: &Sim) -> BTreeSet<String> {
    sim.entries.iter().map(|e| e.name.clone()).collect()
}

/// Sends `n` completions through `envoy` (each with `headers`), and returns the set of servers
/// that answered; every request must succeed.
async fn servers_reached(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> BTreeSet<String> {
    let c = client();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let mut req = c
            .post(envoy.url("/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": "hello there", "max_tokens": 2}));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let server = resp
            .headers()
            .get("x-sim-server")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.text().await.unwrap();
        if status != 200 {
            let clusters = common::get_text(&envoy.admin_url("/clusters")).await;
            panic!(
                "status {status}: {body}\n--- envoy /clusters ---\n{clusters}\n--- envoy log ---\n{}",
                envoy.log()
            );
        }
        assert!(body.contains("text_completion"), "{body}");
        seen.insert(server.expect("x-sim-server on the response"));
    }
    seen
}

#[test]
fn every_flavor_and_body_mode_validates() {
    let p = test_params(
        "127.0.0.1:9002".parse().unwrap(),
        vec![
            "127.0.0.1:8000".parse().unwrap(),
            "[::1]:8001".parse().unwrap(),
        ],
    );
    // Two at a time: each validation is a separate Envoy process.
    std::thread::scope(|s| {
        for flavor in Flavor::ALL {
            let p = &p;
            s.spawn(move || {
                for body_mode in BodyMode::ALL {
                    let p = EnvoyParams {
                        body_mode,
                        localities: Vec::new(),
                        extproc_tls: None,
                        ..p.clone()
                    };
                    validate(&render(flavor, &p));
                }
            });
        }
    });
    // IPv6 listener and no model servers at all render valid configurations too.
    let p = EnvoyParams {
        listen: "[::1]:0".parse().unwrap(),
        endpoints: vec![],
        ..p
    };
    validate(&render(Flavor::Fallback, &p));
}

#[test]
fn checked_in_configs_are_rendered_from_the_code_and_validate() {
    let repo = fleetpick_envoy::repo_root();
    let bless = std::env::var_os("FLEETPICK_BLESS").is_some();
    for (file, flavor, params) in [
        ("envoy/envoy.yaml", Flavor::OriginalDst, user_defaults()),
        (
            "envoy/envoy-fallback.yaml",
            Flavor::Fallback,
            user_defaults(),
        ),
        (
            "envoy/compose-envoy.yaml",
            Flavor::Fallback,
            fleetpick_envoy::compose::params(),
        ),
        (
            "envoy/envoy-tls.yaml",
            Flavor::OriginalDst,
            fleetpick_envoy::EnvoyParams {
                extproc_tls: Some(fleetpick_envoy::user_tls()),
                ..user_defaults()
            },
        ),
    ] {
        let want = render(flavor, &params);
        let path = repo.join(file);
        if bless {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            have == want,
            "{file} differs from what crates/envoy/src/lib.rs renders (flavor {flavor}); regenerate it with \
             FLEETPICK_BLESS=1 cargo test --test integration envoy_config"
        );
        match &params.extproc_tls {
            // Envoy reads the TLS files to validate: the same text, pointing at real ones.
            Some(tls) => {
                let dir = common::scratch("tls-files");
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = rcgen::CertificateParams::new(vec!["envoy".to_string()])
                    .unwrap()
                    .self_signed(&key)
                    .unwrap();
                for name in ["ca.crt", "envoy.crt"] {
                    std::fs::write(dir.path().join(name), cert.pem()).unwrap();
                }
                std::fs::write(dir.path().join("envoy.key"), key.serialize_pem()).unwrap();
                let shipped_dir = Path::new(&tls.ca_file).parent().unwrap().to_str().unwrap();
                validate(&have.replace(shipped_dir, dir.path().to_str().unwrap()));
            }
            None => validate(&have),
        }
    }
}

#[tokio::test]
async fn baselines_spread_requests_over_every_server() {
    let sim = Sim::start(&["--servers", "2", "--time-scale", "20"]).await;
    for (flavor, requests) in [(Flavor::RoundRobin, 10), (Flavor::LeastRequest, 40)] {
        let p = test_params(dead_address(), sim_endpoints(&sim));
        let envoy = envoy::start(&render(flavor, &p)).await;
        assert_ne!(envoy.listen.port(), 0);
        let seen = servers_reached(&envoy, requests, &[]).await;
        assert_eq!(seen, sim_names(&sim), "{flavor}");
    }
}

#[tokio::test]
async fn a_large_request_is_retried_on_another_server_when_the_first_is_down() {
    let sim = Sim::start(&["--servers", "1", "--time-scale", "20"]).await;
    // Round robin over a dead address and a live server: every other request needs a retry,
    // which Envoy can only make with the whole body held (over 1 MiB, Envoy's default).
    let endpoints = vec![dead_address(), sim_endpoints(&sim)[0]];
    let envoy = envoy::start(&render(
        Flavor::RoundRobin,
        &test_params(dead_address(), endpoints),
    ))
    .await;
    let body = serde_json::to_vec(
        &json!({"model": MODEL, "prompt": "hello", "max_tokens": 2, "user": "x".repeat(3 << 20)}),
    )
    .unwrap();
    let c = client();
    for _ in 0..4 {
        let resp = c
            .post(envoy.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let server = resp.headers().get("x-sim-server").cloned();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        assert_eq!(server.unwrap(), sim.entries[0].name.as_str());
    }
}

#[tokio::test]
async fn fallback_fails_open_to_round_robin_while_fleetpick_is_down() {
    let sim = Sim::start(&["--servers", "2", "--time-scale", "20"]).await;
    let p = test_params(dead_address(), sim_endpoints(&sim));
    let envoy = envoy::start(&render(Flavor::Fallback, &p)).await;
    // A client naming its own destination is ignored: the header is stripped before the pick.
    let first = sim.entries[0].address.clone();
    let seen = servers_reached(&envoy, 10, &[(DESTINATION_HEADER, &first)]).await;
    assert_eq!(seen, sim_names(&sim));
}

#[tokio::test]
async fn original_dst_fails_closed_while_fleetpick_is_down() {
    let sim = Sim::start(&["--servers", "1", "--time-scale", "20"]).await;
    let p = test_params(dead_address(), sim_endpoints(&sim));
    let envoy = envoy::start(&render(Flavor::OriginalDst, &p)).await;
    let resp = client()
        .post(envoy.url("/v1/completions"))
        .header(DESTINATION_HEADER, sim.entries[0].address.as_str())
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_server_error(), "status {}", resp.status());
    assert!(resp.headers().get("x-sim-server").is_none());
}

#[tokio::test]
async fn locality_baseline_prefers_priority_zero_and_fails_over_on_its_own() {
    let sim = Sim::start(&[
        "--servers",
        "4",
        "--clusters",
        "near,far",
        "--time-scale",
        "10",
    ])
    .await;
    let group = |cluster: &str, priority: u32| fleetpick_envoy::Locality {
        region: format!("region-of-{cluster}"),
        zone: cluster.to_string(),
        priority,
        endpoints: sim
            .entries
            .iter()
            .filter(|e| e.cluster == cluster)
            .map(|e| e.address.parse().unwrap())
            .collect(),
    };
    let mut p = test_params(dead_address(), Vec::new());
    p.localities = vec![group("near", 0), group("far", 1)];
    let config = render(Flavor::RoundRobin, &p);
    validate(&config);
    let envoy = envoy::start(&config).await;
    // Active health checks must pass before Envoy routes: wait until it has checked every host
    // (until then a partly checked priority 0 lets some traffic through to priority 1).
    let all: Vec<SocketAddr> = sim_endpoints(&sim);
    wait_for_health(&envoy, &all, "healthy").await;
    let near: BTreeSet<String> = ["near-0", "near-1"].map(String::from).into();
    assert_eq!(servers_reached(&envoy, 20, &[]).await, near);
    client()
        .post(sim.admin_url("/clusters/near/stop"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    // Health checks find it gone; priority 1 takes over once both near hosts have failed one
    // (with one failed, priority 0 still takes 70% of the traffic, to the other dead host).
    wait_for_health(&envoy, &p.localities[0].endpoints, "/failed_active_hc").await;
    // Each of Envoy's worker threads applies the verdict a moment after its main thread shows
    // it: wait until a run of requests has gone to priority 1.
    let far: BTreeSet<String> = ["far-0", "far-1"].map(String::from).into();
    let streak = std::cell::Cell::new(0);
    common::wait_for(
        "a run of 5 requests served by priority 1",
        std::time::Duration::from_secs(30),
        || {
            let (envoy, far, streak) = (&envoy, &far, &streak);
            async move {
                let (status, server) =
                    common::complete(&client(), &envoy.url("/v1/completions"), &[]).await;
                let to_far = status == 200 && server.is_some_and(|s| far.contains(&s));
                streak.set(if to_far { streak.get() + 1 } else { 0 });
                (streak.get() >= 5).then_some(())
            }
        },
    )
    .await;
    assert_eq!(servers_reached(&envoy, 20, &[]).await, far);
}

/// Waits until Envoy's admin `/clusters` shows `flags` as the health of every host in `hosts`
/// of the model cluster.
async fn wait_for_health(envoy: &Envoy, hosts: &[SocketAddr], flags: &str) {
    let url = format!("http://{}/clusters", envoy.admin);
    let want: Vec<String> = hosts
        .iter()
        .map(|h| format!("{MODEL_CLUSTER}::{h}::health_flags::{flags}"))
        .collect();
    common::wait_for(
        &format!("Envoy to see {hosts:?} as {flags}"),
        std::time::Duration::from_secs(30),
        || {
            let (url, want) = (&url, &want);
            async move {
                let page = client().get(url).send().await.ok()?.text().await.ok()?;
                let lines: BTreeSet<&str> = page.lines().collect();
                want.iter()
                    .all(|w| lines.contains(w.as_str()))
                    .then_some(())
            }
        },
    )
    .await;
}
