//! Micro-benchmarks of the request path: picking an endpoint among 10 to 10,000, and reading a
//! large chat body (the parse, then the picker's rendering of it); and of fleetpick's
//! `/metrics` page, rendered for 64 and 1,000 endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up may panic

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fleetpick_config::{FleetConfig, Weights};
use fleetpick_core::fleet::Fleet;
use fleetpick_core::profile::LoadSample;
use fleetpick_core::schedule::{PickRequest, pick};
use fleetpick_protocol::openai::{Api, InferenceRequest};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A fleet of `n` endpoints in one pool over four clusters, every one freshly scraped with
/// varied load.
fn fleet(n: usize) -> Fleet {
    let mut yaml = String::from(
        "clusters: [{name: a}, {name: b}, {name: c}, {name: d}]\npools:\n  - name: p\n",
    );
    yaml.push_str(&format!(
        "    models: [{MODEL}]\n    target_port: 8000\n    endpoints:\n"
    ));
    for (ci, c) in ["a", "b", "c", "d"].iter().enumerate() {
        let ips: Vec<String> = (0..n)
            .filter(|i| i % 4 == ci)
            .map(|i| format!("10.{}.{}.{}", ci, i / 250, i % 250 + 1))
            .collect();
        if !ips.is_empty() {
            yaml.push_str(&format!("      {c}: [{}]\n", ips.join(", ")));
        }
    }
    yaml.push_str("poller: {stale_after_ms: 3600000}\n");
    let f = Fleet::new(&FleetConfig::parse(&yaml, "bench").expect("bench fleet"));
    let mut rng = fastrand::Rng::with_seed(7);
    let now = f.clock.now_ms();
    for e in &f.endpoints {
        let s = LoadSample {
            waiting: rng.u32(..8),
            running: rng.u32(..64),
            kv_usage: rng.f64(),
            ..LoadSample::default()
        };
        e.load.store(&s, now);
    }
    f
}

fn pick_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [10, 100, 1_000, 10_000] {
        let f = fleet(n);
        let weights = Weights::default();
        let req = PickRequest {
            model: Some(MODEL),
            subset: None,
            explain: false,
            prefix: &[],
            session: None,
            sheddable: false,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(pick(&f, &req, &weights, 0, &mut rng)))
        });
    }
    group.finish();
}

/// Criterion reports the mean; the goal is about the tail. Times 100,000 single picks among
/// 1,000 endpoints one by one and prints their percentiles.
fn pick_tail(_c: &mut Criterion) {
    for n in [1_000, 10_000] {
        let f = fleet(n);
        let weights = Weights::default();
        let req = PickRequest {
            model: Some(MODEL),
            subset: None,
            explain: false,
            prefix: &[],
            session: None,
            sheddable: false,
        };
        let mut rng = fastrand::Rng::with_seed(2);
        let mut times: Vec<u64> = (0..100_000)
            .map(|_| {
                let t = std::time::Instant::now();
                black_box(pick(&f, &req, &weights, 0, &mut rng)).ok();
                t.elapsed().as_nanos() as u64
            })
            .collect();
        times.sort_unstable();
        let at = |q: f64| {
            times[((q * times.len() as f64) as usize).min(times.len() - 1)] as f64 / 1000.0
        };
        println!(
            "pick/{n} single-call latency over 100,000 picks: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us",
            at(0.50),
            at(0.99),
            at(0.999),
            at(1.0)
        );
    }
}

/// Picking with the prefix scorer: a 32 KB prompt (hashed on every pick, as the service does)
/// among 1,000 endpoints whose index holds 64 shared 8 KB system prompts, each at a few
/// endpoints, plus the prompt's own prefix at three. Prints single-call percentiles of hashing
/// plus picking (the goal is about p99) after criterion's mean.
fn pick_prefix(c: &mut Criterion) {
    let f = fleet(1_000);
    let mut rng = fastrand::Rng::with_seed(3);
    for g in 0..64u8 {
        let system = fleetpick_loadgen::filler_text(u64::from(g), 8 * 1024);
        let hashes = fleetpick_core::prefix::prompt_hashes(MODEL, None, system.as_bytes());
        for _ in 0..4 {
            f.prefix.record(rng.usize(..1_000), &hashes);
        }
    }
    let prompt = fleetpick_loadgen::filler_text(99, 32 * 1024);
    let held = fleetpick_core::prefix::prompt_hashes(MODEL, None, &prompt.as_bytes()[..8 * 1024]);
    for e in [10, 500, 990] {
        f.prefix.record(e, &held);
    }
    let weights = Weights::default();
    let one = |rng: &mut fastrand::Rng| {
        let hashes = fleetpick_core::prefix::prompt_hashes(MODEL, None, prompt.as_bytes());
        let req = PickRequest {
            model: Some(MODEL),
            subset: None,
            explain: false,
            prefix: &hashes,
            session: None,
            sheddable: false,
        };
        pick(&f, &req, &weights, 0, rng).unwrap().primary
    };
    c.bench_function("pick_prefix/1000_endpoints_32KB_prompt", |b| {
        b.iter(|| black_box(one(&mut rng)))
    });
    let mut times: Vec<u64> = (0..100_000)
        .map(|_| {
            let t = std::time::Instant::now();
            black_box(one(&mut rng));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    times.sort_unstable();
    let at =
        |q: f64| times[((q * times.len() as f64) as usize).min(times.len() - 1)] as f64 / 1000.0;
    println!(
        "pick_prefix/1000 with a 32 KB prompt, hashing included, over 100,000 picks: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

/// A chat body of 256 KB: a 200 KB system prompt and a 56 KB user message.
fn chat_body_256k() -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": fleetpick_loadgen::filler_text(1, 200 * 1024)},
            {"role": "user", "content": [{"type": "text", "text": fleetpick_loadgen::filler_text(2, 56 * 1024)}]}
        ],
        "max_tokens": 16,
        "stream": true
    })
    .to_string()
}

/// The parse alone: the body into the model, the messages and the options.
fn parse_chat_256k(c: &mut Criterion) {
    let body = chat_body_256k();
    c.bench_function(
        &format!("openai/parse_chat_256KB ({} bytes)", body.len()),
        |b| {
            b.iter(|| {
                black_box(InferenceRequest::parse(
                    Api::ChatCompletions,
                    black_box(body.as_bytes()),
                ))
            })
        },
    );
}

/// The picker's rendering of the parsed conversation into the bytes it hashes (done only for
/// pools that score prefixes).
fn render_chat_256k(c: &mut Criterion) {
    let body = chat_body_256k();
    let req = InferenceRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
    c.bench_function("prompt/render_chat_256KB", |b| {
        b.iter(|| black_box(fleetpick_core::prompt::prefix_bytes(black_box(&req.input))))
    });
}

/// One `/metrics` render (the gauges read from the fleet, then the text encoding): what a
/// scrape costs fleetpick beside the HTTP exchange.
fn metrics_render(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_render");
    for n in [64, 1_000] {
        let f = fleet(n);
        let m = fleetpick::telemetry::Metrics::new(&f);
        let bytes = m.render(&f).unwrap().len();
        eprintln!("metrics_render/{n}: {bytes} bytes");
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(m.render(&f).unwrap()))
        });
    }
    group.finish();
}

/// Recording picks in the prefix index: one endpoint whose memory (2,048 blocks) keeps turning
/// over, fed 16 KB prompts (256 blocks) that share an 8 KB system prompt with one of 16 others,
/// so each record refreshes held blocks and adds and evicts others, as the service does after
/// every pick.
fn prefix_record(c: &mut Criterion) {
    let index = fleetpick_core::prefix::PrefixIndex::new(4);
    let prompts: Vec<Vec<u64>> = (0..256u64)
        .map(|i| {
            let system = fleetpick_loadgen::filler_text(i % 16, 8 * 1024);
            let question = fleetpick_loadgen::filler_text(1_000 + i, 8 * 1024);
            let text = format!("{system}{question}");
            fleetpick_core::prefix::prompt_hashes(MODEL, None, text.as_bytes())
        })
        .collect();
    let mut i = 0;
    c.bench_function("prefix/record_256_blocks", |b| {
        b.iter(|| {
            index.record(1, black_box(&prompts[i % prompts.len()]));
            i += 1;
        })
    });
}

/// Session affinity's memory on the request path: a lookup, then a bind, for sessions drawn
/// from 200,000 with a skew (a few conversations busy, most idle), in a memory of 65,536.
fn sessions(c: &mut Criterion) {
    let s = fleetpick_core::session::Sessions::new(&fleetpick_config::SessionAffinity {
        header: Some("x-session-id".into()),
        cookie: None,
        max_sessions: 65_536,
    });
    let mut rng = fastrand::Rng::with_seed(11);
    let keys: Vec<String> = (0..4_096)
        .map(|_| {
            // The minimum of three draws: low ids far more often than high ones.
            let id = (0..3).map(|_| rng.u32(..200_000)).min().unwrap_or(0);
            format!("session-{id}")
        })
        .collect();
    let mut i = 0;
    c.bench_function("sessions/get_then_bind", |b| {
        b.iter(|| {
            let key = &keys[i % keys.len()];
            let at = s.get(black_box(key)).unwrap_or(i % 64);
            s.bind(key, at);
            i += 1;
        })
    });
}

criterion_group!(
    benches,
    metrics_render,
    pick_latency,
    pick_tail,
    pick_prefix,
    prefix_record,
    sessions,
    parse_chat_256k,
    render_chat_256k
);
criterion_main!(benches);
