//! Affinities and rewrites end to end, through the real Envoy and the simulator: prompts that
//! share a long prefix land together (and the simulator's prefix cache shows the hits), LoRA
//! requests go where their adapter runs, a rewritten model reaches the server under its target
//! name while the client sees its own, and a session cookie keeps a conversation in one place.

use fleetpick_tests as common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::envoy::{self, Envoy};
use common::{MODEL, Picker, Sim, client, fleet_yaml, get_text, metric, wait_for};
use fleetpick_envoy::{BodyMode, Flavor};
use serde_json::{Value, json};

const POLL: &str = "poller: {interval_ms: 50, stale_after_ms: 2000, backoff_max_ms: 200}\n";

/// A simulator with `servers` servers and the engine defaults `defaults` (YAML flow map).
async fn sim(servers: usize, defaults: &str) -> Sim {
    let n = servers.to_string();
    Sim::start_with_config(&["--servers", &n], &format!("defaults: {defaults}\n")).await
}

/// fleetpick on a fleet file for `sim` whose pool gets the fields `pool_fields` (YAML lines at
/// the pool's indent) and whose file ends with `top` (top-level YAML); Envoy in front.
async fn picker_and_envoy(
    sim: &Sim,
    pool_fields: &str,
    top: &str,
    body_mode: BodyMode,
) -> (Picker, Envoy) {
    let picker = Picker::start(&fleet_yaml(
        &sim.entries,
        &format!("{pool_fields}{POLL}{top}"),
    ))
    .await;
    let envoy = envoy::in_front_of(Flavor::OriginalDst, body_mode, picker.grpc, sim).await;
    envoy::until_routing(&envoy).await;
    (picker, envoy)
}

/// A response's status, headers and body text.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

async fn post(envoy: &Envoy, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = client().post(envoy.url(path)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

#[tokio::test]
async fn requests_sharing_a_long_prefix_land_together_and_hit_the_servers_cache() {
    let sim = sim(4, "{}").await;
    let (_picker, envoy) = picker_and_envoy(&sim, "", "", BodyMode::FullDuplex).await;
    let mut holders = Vec::new();
    for group in ["alpha", "beta"] {
        // A long system prompt shared by the group, then a short question of its own.
        let system = format!("You are the {group} assistant. ").repeat(200);
        let mut served = BTreeSet::new();
        for q in 0..10 {
            let r = post(
                &envoy,
                "/v1/chat/completions",
                &json!({"model": MODEL, "max_tokens": 2, "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": format!("question {q}?")},
                ]}),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            served.insert(r.header("x-sim-server").unwrap());
        }
        assert_eq!(served.len(), 1, "group {group} spread over {served:?}");
        holders.push(served.into_iter().next().unwrap());
    }
    // The simulator's own counters: after each group's first request, the shared prefix was
    // served from the cache.
    let mut hits = BTreeMap::new();
    let mut queries = BTreeMap::new();
    for (i, e) in sim.entries.iter().enumerate() {
        let page = get_text(&sim.url(i, "/metrics")).await;
        hits.insert(
            e.name.clone(),
            metric(&page, "vllm:prefix_cache_hits_total").unwrap(),
        );
        queries.insert(
            e.name.clone(),
            metric(&page, "vllm:prefix_cache_queries_total").unwrap(),
        );
    }
    let total_hits: f64 = hits.values().sum();
    // Nine of ten requests per group hit, each on the whole shared prefix in full blocks. By
    // the simulator's template and tokenizer the prompts share 1,414 tokens: <|begin_of_text|>,
    // the system header (4), the system prompt (200 x 7 tokens, and its last space), <|eot_id|>,
    // the user header (4), and "questi", "on", " " before the question's number. That is 88
    // full blocks of 16: 1,408 tokens a hit.
    let want = holders.len() as f64 * 9.0 * 1408.0;
    assert!(
        total_hits >= want,
        "prefix cache hits {total_hits} < {want}: hits {hits:?}, queries {queries:?}, holders {holders:?}"
    );
    for holder in &holders {
        assert!(hits[holder] > 0.0, "{holder} holds a prefix: {hits:?}");
    }
}

#[tokio::test]
async fn a_rewritten_model_reaches_the_server_as_its_target_and_the_client_sees_its_own() {
    let sim = sim(2, "{lora_adapters: [ad-1]}").await;
    let rewrite = format!(
        "rewrites:\n  - model: assistant\n    targets: [{{model: \"{MODEL}\", weight: 1}}, {{model: ad-1, weight: 1}}]\n"
    );
    let (picker, envoy) = picker_and_envoy(
        &sim,
        "    lora_adapters: [ad-1]\n",
        &rewrite,
        BodyMode::FullDuplex,
    )
    .await;
    let buffered =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::Buffered, picker.grpc, &sim).await;
    let mut targets = BTreeMap::<String, u32>::new();
    for (i, envoy) in [&envoy, &buffered].into_iter().cycle().take(40).enumerate() {
        let stream = i % 4 < 2;
        let path = if i % 3 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let body = if path.contains("chat") {
            json!({"model": "assistant", "max_tokens": 5, "stream": stream,
                   "messages": [{"role": "user", "content": "hello"}]})
        } else {
            json!({"model": "assistant", "max_tokens": 5, "stream": stream, "prompt": "hello"})
        };
        let r = post(envoy, path, &body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        // The server was asked for a target (it knows no `assistant`: it would answer 404).
        let target = r.header("x-sim-model").unwrap();
        assert!(target == MODEL || target == "ad-1", "{target}");
        *targets.entry(target).or_default() += 1;
        // The client sees its own name everywhere the server wrote the model.
        if stream {
            let events: Vec<&str> = r
                .body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
            assert!(events.len() >= 3, "{}", r.body);
            for e in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap();
                assert_eq!(v["model"], "assistant", "{e}");
            }
        } else {
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["model"], "assistant", "{}", r.body);
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        }
        assert!(
            !r.body.contains("ad-1") && !r.body.contains(MODEL),
            "{}",
            r.body
        );
    }
    assert_eq!(targets.len(), 2, "both targets drawn: {targets:?}");
    // A model that is not rewritten is left alone.
    let r = post(
        &envoy,
        "/v1/completions",
        &json!({"model": MODEL, "max_tokens": 2, "prompt": "hi"}),
        &[],
    )
    .await;
    assert_eq!(r.header("x-sim-model").as_deref(), Some(MODEL));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["model"], MODEL);
}

#[tokio::test]
async fn lora_requests_go_where_their_adapter_runs_and_not_where_slots_are_full() {
    let sim = sim(4, "{lora_adapters: [ad-1, ad-2], max_lora: 1}").await;
    // Server 2 runs ad-1 for long requests sent to it directly: its one adapter slot is taken.
    let background = common::long_streams(&sim, 2, "ad-1", 2);
    let url = sim.url(2, "/metrics");
    wait_for("ad-1 running on server 2", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            get_text(&url)
                .await
                .contains("running_lora_adapters=\"ad-1\"")
                .then_some(())
        }
    })
    .await;
    let (_picker, envoy) = picker_and_envoy(
        &sim,
        "    lora_adapters: [ad-1, ad-2]\n",
        "",
        BodyMode::FullDuplex,
    )
    .await;
    let holder = sim.entries[2].name.clone();
    for _ in 0..10 {
        let r = post(
            &envoy,
            "/v1/completions",
            &json!({"model": "ad-1", "prompt": "hi", "max_tokens": 2}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("x-sim-server"),
            Some(holder.clone()),
            "ad-1 goes where it runs"
        );
        let r = post(
            &envoy,
            "/v1/completions",
            &json!({"model": "ad-2", "prompt": "hi", "max_tokens": 2}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_ne!(
            r.header("x-sim-server"),
            Some(holder.clone()),
            "ad-2 finds no free slot there"
        );
    }
    for b in background {
        b.abort();
    }
}

#[tokio::test]
async fn a_session_stays_on_one_endpoint_by_cookie_or_header() {
    let sim = sim(4, "{}").await;
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
    // Cookie: fleetpick sets one on the first response; the requests that carry it follow.
    let (_picker, envoy) = picker_and_envoy(
        &sim,
        "    session_affinity: {cookie: fp-session}\n",
        "",
        BodyMode::FullDuplex,
    )
    .await;
    let mut first_servers = BTreeSet::new();
    for _ in 0..3 {
        let first = post(&envoy, "/v1/completions", &body, &[]).await;
        assert_eq!(first.status, 200, "{}", first.body);
        let set = first.header("set-cookie").expect("a session cookie");
        assert!(
            set.starts_with("fp-session=") && set.contains("HttpOnly"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_string();
        let server = first.header("x-sim-server").unwrap();
        for _ in 0..12 {
            let r = post(
                &envoy,
                "/v1/completions",
                &body,
                &[("cookie", &format!("theme=x; {cookie}"))],
            )
            .await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.header("x-sim-server"),
                Some(server.clone()),
                "session {cookie}"
            );
            assert_eq!(
                r.header("set-cookie"),
                None,
                "the session has its cookie already"
            );
        }
        first_servers.insert(server);
    }
    drop(envoy);
    // Header: the client names the session.
    let (_picker2, envoy) = picker_and_envoy(
        &sim,
        "    session_affinity: {header: x-session-id}\n",
        "",
        BodyMode::FullDuplex,
    )
    .await;
    let mut by_session = BTreeMap::<String, BTreeSet<String>>::new();
    for i in 0..36 {
        let session = format!("conversation-{}", i % 3);
        let r = post(
            &envoy,
            "/v1/completions",
            &body,
            &[("x-session-id", &session)],
        )
        .await;
        assert_eq!(r.status, 200);
        by_session
            .entry(session)
            .or_default()
            .insert(r.header("x-sim-server").unwrap());
    }
    for (session, servers) in &by_session {
        assert_eq!(servers.len(), 1, "{session} moved: {servers:?}");
    }
    // Without a session, requests spread over the idle servers as usual.
    let spread: BTreeSet<String> = {
        let mut s = BTreeSet::new();
        for _ in 0..40 {
            s.insert(
                post(&envoy, "/v1/completions", &body, &[])
                    .await
                    .header("x-sim-server")
                    .unwrap(),
            );
        }
        s
    };
    assert!(spread.len() >= 2, "{spread:?}");
}
