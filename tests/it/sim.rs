//! Black-box tests of `fleetpick sim` over real sockets: the OpenAI API, the engine model as
//! seen through `/metrics`, and the admin API's faults.

use fleetpick_tests as common;

use std::time::{Duration, Instant};

use common::{MODEL, Sim, client, get_text, metric, wait_for};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Splits an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn openai_api_counts_tokens_streaming_and_not() {
    let sim = Sim::start(&[
        "--servers",
        "2",
        "--clusters",
        "east,west",
        "--time-scale",
        "20",
    ])
    .await;
    let c = client();

    // Non-streaming completions.
    let resp = c
        .post(sim.url(1, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "hello there", "max_tokens": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-sim-server"], sim.entries[1].name.as_str());
    assert_eq!(resp.headers()["x-sim-cluster"], "west");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    // <|begin_of_text|>, "hello", " there".
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        7
    );

    // Non-streaming chat, body sent chunked (as Envoy sends it).
    let body = serde_json::to_vec(
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    )
    .unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(5).map(|c| Ok(c.to_vec())).collect();
    let resp = c
        .post(sim.url(0, "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 4);

    // Streaming chat with a usage chunk.
    let resp = c
        .post(sim.url(0, "/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let tokens = parsed
        .iter()
        .filter(|e| {
            e["choices"][0]["finish_reason"].is_null()
                && e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(tokens, 5);
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = parsed.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // Streaming completions without usage: no usage chunk.
    let resp = c
        .post(sim.url(0, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(
        events.len(),
        3 + 1 + 1,
        "3 tokens, the finish chunk, [DONE]: {events:?}"
    );
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));

    // A batch of prompts gets one choice each.
    let v: Value = c
        .post(sim.url(0, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // Generation counters on /metrics match what was served on server 0: 4 + 5 + 3 + 6.
    let page = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(metric(&page, "vllm:generation_tokens_total"), Some(18.0));

    let v: Value = c
        .get(sim.url(0, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(
        c.get(sim.url(0, "/health")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn bad_input_gets_openai_errors() {
    let sim = Sim::start(&["--servers", "1"]).await;
    let c = client();
    let cases = [
        ("/v1/completions", "{not json".to_string(), 400, None),
        (
            "/v1/completions",
            json!({"prompt": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "max_tokens": -1}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "max_tokens": 9000}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}).to_string(),
            404,
            Some("model"),
        ),
        ("/v1/nothing", "{}".to_string(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let resp = c
            .post(sim.url(0, path))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        assert_eq!(resp.headers()["x-sim-server"], "local-0");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], status, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    }
    // A body over the 64 MiB limit is refused from its content-length, before it is sent (a raw
    // socket, since an HTTP client would fail writing the body the server will not read).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(&sim.entries[0].address)
            .await
            .unwrap();
        sock.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: 70000000\r\n\r\n{").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("\"code\":413") {
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    let resp = c.get(sim.url(0, "/v1/completions")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 405);
    // The server still serves after all that.
    let resp = c
        .post(sim.url(0, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn repeated_prefix_hits_the_cache() {
    let sim = Sim::start(&["--servers", "1", "--time-scale", "20"]).await;
    let c = client();
    // 8,000 bytes of filler: with <|begin_of_text|> and a suffix, 1,900 tokens a prompt.
    let shared = fleetpick_loadgen::filler_text(7, 8000);
    let send = |suffix: &str| {
        c.post(sim.url(0, "/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": format!("{shared}{suffix}"), "max_tokens": 2}))
            .send()
    };
    let first: Value = send("first question").await.unwrap().json().await.unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let page = get_text(&sim.url(0, "/metrics")).await;
    let hits_before = metric(&page, "vllm:prefix_cache_hits_total").unwrap();
    let second: Value = send("second question").await.unwrap().json().await.unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_f64()
        .unwrap();
    // The prompts share 1,896 tokens (the shared text's last word runs into the suffix): 118
    // full blocks of 16.
    assert_eq!(cached, 1888.0, "cached {cached}");
    let page = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(
        metric(&page, "vllm:prefix_cache_hits_total").unwrap() - hits_before,
        cached
    );
    assert!(metric(&page, "vllm:prefix_cache_queries_total").unwrap() >= 2.0 * 1900.0);
    // The cached request skipped its prefill: the simulator's own prefill-time histogram shows
    // one request at the full prefill (25 + 1,900 x 0.15 = 310 ms simulated) and one well under
    // it.
    let fast = metric(&page, "vllm:request_prefill_time_seconds_bucket{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\",le=\"0.3\"}").unwrap();
    assert_eq!(fast, 1.0, "{page}");
    // A different cache salt shares nothing.
    let salted: Value = c
        .post(sim.url(0, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": format!("{shared}third"), "max_tokens": 2, "cache_salt": "tenant-b"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(salted["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn kv_usage_and_queue_follow_load() {
    // Two sequences at most per batch, so a third request must wait.
    let sim = Sim::start_with_config(
        &["--servers", "1", "--time-scale", "10"],
        "defaults:\n  max_num_seqs: 2\n",
    )
    .await;
    let url = sim.url(0, "/v1/completions");
    let mut streams = Vec::new();
    for i in 0..3 {
        let body = json!({"model": MODEL, "prompt": fleetpick_loadgen::filler_text(i, 24_000), "max_tokens": 300, "stream": true});
        let c = client();
        let url = url.clone();
        streams.push(tokio::spawn(async move {
            let text = c
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"));
        }));
    }
    let metrics = sim.url(0, "/metrics");
    let (kv, waiting) = wait_for(
        "two long requests running and one waiting",
        Duration::from_secs(30),
        || {
            let metrics = metrics.clone();
            async move {
                let page = get_text(&metrics).await;
                let kv = metric(&page, "vllm:kv_cache_usage_perc")?;
                let running = metric(&page, "vllm:num_requests_running")?;
                let waiting = metric(&page, "vllm:num_requests_waiting")?;
                (running == 2.0 && waiting == 1.0 && kv > 0.3).then_some((kv, waiting))
            }
        },
    )
    .await;
    // 2 x 5,734 prompt tokens or more (359 blocks each) of 32,768 is 35%.
    assert!(kv > 0.3 && waiting == 1.0);
    for s in streams {
        s.await.unwrap();
    }
    let page = get_text(&metrics).await;
    assert_eq!(metric(&page, "vllm:kv_cache_usage_perc"), Some(0.0));
    assert_eq!(metric(&page, "vllm:num_requests_running"), Some(0.0));
    assert_eq!(metric(&page, "vllm:gpu_cache_usage_perc"), Some(0.0));
    // The third request queued behind two that each decoded 300 tokens (>= 25 ms a step).
    let queued = metric(&page, "vllm:request_queue_time_seconds_sum").unwrap();
    assert!(queued >= 299.0 * 0.025, "queue time {queued}");
    assert_eq!(
        metric(&page, "vllm:request_success_total"),
        Some(0.0),
        "first series is finished_reason=stop"
    );
    assert!(page.contains("finished_reason=\"length\"} 3.0"));
}

#[tokio::test]
async fn stopped_server_refuses_connections_and_recovers() {
    let sim = Sim::start(&["--servers", "2", "--clusters", "a,b"]).await;
    let c = client();
    let health = sim.url(0, "/health");
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
    let v: Value = c
        .post(sim.admin_url("/servers/a-0/stop"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v[0]["up"], false);
    // A new connection is refused (the pooled one was dropped by the crash).
    let err = client().get(&health).send().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    // The other cluster is untouched.
    assert_eq!(
        c.get(sim.url(1, "/health")).send().await.unwrap().status(),
        200
    );
    c.post(sim.admin_url("/servers/a-0/start"))
        .send()
        .await
        .unwrap();
    // Fresh clients from here on: a pooled connection to a crashed server is dead.
    assert_eq!(client().get(&health).send().await.unwrap().status(), 200);
    // A whole cluster.
    c.post(sim.admin_url("/clusters/b/stop"))
        .send()
        .await
        .unwrap();
    assert!(
        client()
            .get(sim.url(1, "/health"))
            .send()
            .await
            .unwrap_err()
            .is_connect()
    );
    c.post(sim.admin_url("/clusters/b/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        client()
            .get(sim.url(1, "/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Unknown names are 404s in the error shape.
    let resp = c
        .post(sim.admin_url("/servers/zz/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("zz"));
}

#[tokio::test]
async fn faults_errors_frozen_metrics_and_network_delay() {
    let sim = Sim::start(&["--servers", "2", "--clusters", "near,far"]).await;
    let c = client();
    let req = |i: usize| {
        c.post(sim.url(i, "/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1}))
            .send()
    };
    // Every request fails with the chosen status.
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"error_rate": 1.0, "error_status": 500}))
        .send()
        .await
        .unwrap();
    let resp = req(0).await.unwrap();
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"error_rate": 0.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(req(0).await.unwrap().status(), 200);

    // A frozen /metrics keeps showing the old page while the counters move.
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"metrics_frozen": true}))
        .send()
        .await
        .unwrap();
    let frozen = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(req(0).await.unwrap().status(), 200);
    assert_eq!(get_text(&sim.url(0, "/metrics")).await, frozen);
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"metrics_frozen": false}))
        .send()
        .await
        .unwrap();
    let live = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(
        metric(&live, "vllm:generation_tokens_total").unwrap(),
        metric(&frozen, "vllm:generation_tokens_total").unwrap() + 1.0
    );

    // A reported KV use that is not the real one, and back.
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"kv_usage_override": 0.95}))
        .send()
        .await
        .unwrap();
    let page = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(metric(&page, "vllm:kv_cache_usage_perc"), Some(0.95));
    assert_eq!(metric(&page, "vllm:gpu_cache_usage_perc"), Some(0.95));
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"kv_usage_override": null}))
        .send()
        .await
        .unwrap();
    let page = get_text(&sim.url(0, "/metrics")).await;
    assert_eq!(metric(&page, "vllm:kv_cache_usage_perc"), Some(0.0));

    // Slow /metrics and a network delay on the far cluster: lower bounds only.
    c.post(sim.admin_url("/servers/near-0/faults"))
        .json(&json!({"metrics_delay_ms": 300}))
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    get_text(&sim.url(0, "/metrics")).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    c.post(sim.admin_url("/clusters/far/faults"))
        .json(&json!({"network_delay_ms": 250}))
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    assert_eq!(req(1).await.unwrap().status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(250));
    let v: Value = c
        .get(sim.admin_url("/clusters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v[1]["network_delay_ms"], 250.0);
    // A bad faults body is refused with the field named.
    let resp = c
        .post(sim.admin_url("/servers/far-0/faults"))
        .json(&json!({"error_rate": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("error_rate"));
}

#[tokio::test]
async fn client_that_goes_away_frees_its_slot() {
    let sim = Sim::start(&["--servers", "1"]).await;
    let c = client();
    let resp = c
        .post(sim.url(0, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "tell me everything", "max_tokens": 5000, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    assert!(body.next().await.unwrap().is_ok());
    let metrics = sim.url(0, "/metrics");
    let page = get_text(&metrics).await;
    assert_eq!(metric(&page, "vllm:num_requests_running"), Some(1.0));
    drop(body);
    wait_for(
        "the abandoned request to leave the batch",
        Duration::from_secs(20),
        || {
            let metrics = metrics.clone();
            async move {
                let page = get_text(&metrics).await;
                (metric(&page, "vllm:num_requests_running")? == 0.0
                    && metric(&page, "vllm:kv_cache_usage_perc")? == 0.0)
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn sglang_names_and_heterogeneous_config() {
    let sim = Sim::start_with_config(
        &["--servers", "2", "--clusters", "small,big"],
        "clusters:\n  big:\n    engine: {num_blocks: 8192}\nservers:\n  small-0: {num_blocks: 512, max_model_len: 4096, lora_adapters: [sql-lora]}\n",
    )
    .await;
    let small = get_text(&sim.url(0, "/metrics")).await;
    assert!(small.contains("num_gpu_blocks=\"512\""));
    let big = get_text(&sim.url(1, "/metrics")).await;
    assert!(big.contains("num_gpu_blocks=\"8192\""));
    // The adapter is served only where it is configured.
    let c = client();
    let lora = json!({"model": "sql-lora", "prompt": "select", "max_tokens": 1});
    assert_eq!(
        c.post(sim.url(0, "/v1/completions"))
            .json(&lora)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.post(sim.url(1, "/v1/completions"))
            .json(&lora)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let sg = Sim::start(&["--servers", "1", "--metrics-format", "sglang"]).await;
    let page = get_text(&sg.url(0, "/metrics")).await;
    assert_eq!(metric(&page, "sglang:num_queue_reqs"), Some(0.0));
    assert_eq!(metric(&page, "sglang:token_usage"), Some(0.0));
    assert!(page.contains("sglang:cache_config_info{num_pages=\"2048\",page_size=\"16\"}"));
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let dir = common::scratch("badcfg");
    let cfg = dir.path().join("sim.yaml");
    std::fs::write(&cfg, "defaults:\n  max_num_seqs: 4\n  num_blcks: 3\n").unwrap();
    let out = std::process::Command::new(common::bin("fleetpick-lab"))
        .args(["sim", "--servers", "1", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_blcks") && err.contains("line 3"), "{err}");

    std::fs::write(&cfg, "servers:\n  nobody-0: {max_num_seqs: 4}\n").unwrap();
    let out = std::process::Command::new(common::bin("fleetpick-lab"))
        .args(["sim", "--servers", "1", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("servers.nobody-0"));
}

#[test]
fn same_seed_same_text() {
    // Deterministic for a seed: one request at a time gives the same generated text.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let texts: Vec<String> = (0..2)
        .map(|_| {
            rt.block_on(async {
                let sim =
                    Sim::start(&["--servers", "1", "--seed", "42", "--time-scale", "50"]).await;
                let v: Value = client()
                    .post(sim.url(0, "/v1/completions"))
                    .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 12}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    assert_eq!(texts[0], texts[1]);
}
