//! Micro-benchmarks of reading endpoint load: parsing a real-size `/metrics` page with the engine
//! profiles. Every endpoint is polled every 50 ms, so this runs thousands of times a second in a
//! large fleet; the goal is under 50 µs for a busy vLLM page.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up may panic

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fleetpick::collect::profile::{EngineKind, parse};
use fleetpick::sim::engine::EngineGauges;
use fleetpick::sim::metrics::{Snapshot, Stats, render};
use fleetpick::sim::params::{EngineParams, MetricsFormat};

/// Stats after 10 000 requests, so every histogram bucket has a multi-digit count, as on a
/// server that has been up for a while.
fn busy_stats() -> Stats {
    let mut s = Stats::default();
    for i in 0..10_000 {
        let x = f64::from(i % 997) / 100.0;
        s.ttft.observe(x);
        s.itl.observe(x / 50.0);
        s.tpot.observe(x / 50.0);
        s.e2e.observe(x * 3.0);
        s.queue_time.observe(x / 2.0);
        s.prefill_time.observe(x / 3.0);
        s.decode_time.observe(x);
        s.inference_time.observe(x * 2.0);
        s.prompt_len.observe(f64::from(i % 4000));
        s.generation_len.observe(f64::from(i % 500));
        s.iteration_tokens.observe(f64::from(i % 2048));
    }
    s.prompt_tokens = 19_990_000;
    s.generation_tokens = 2_495_000;
    s.prefix_queries = 1_234_567;
    s.prefix_hits = 765_432;
    s.success_length = 1_200;
    s.success_stop = 8_800;
    s
}

fn parse_pages(c: &mut Criterion) {
    let snap = Snapshot {
        gauges: EngineGauges {
            running: 37,
            waiting: 4,
            kv_usage: 0.61,
            running_adapters: vec!["sql-lora".into(), "chat-lora".into()],
            waiting_adapters: vec!["tool-lora".into()],
        },
        stats: busy_stats(),
        started_unix: 1.79e9,
        now_unix: 1.79e9 + 3600.0,
    };

    let vllm = render(&EngineParams::default(), &snap);
    assert!(
        parse(EngineKind::Vllm, &vllm).is_ok_and(|s| s.running == 37 && s.lora.is_some()),
        "the vLLM page must parse"
    );
    c.bench_function(&format!("collect/parse_vllm ({} bytes)", vllm.len()), |b| {
        b.iter(|| black_box(parse(EngineKind::Vllm, black_box(&vllm))))
    });

    let sglang = render(
        &EngineParams {
            metrics_format: MetricsFormat::Sglang,
            ..EngineParams::default()
        },
        &snap,
    );
    assert!(
        parse(EngineKind::Sglang, &sglang).is_ok_and(|s| s.waiting == 4 && s.cache.is_some()),
        "the SGLang page must parse"
    );
    c.bench_function(
        &format!("collect/parse_sglang ({} bytes)", sglang.len()),
        |b| b.iter(|| black_box(parse(EngineKind::Sglang, black_box(&sglang)))),
    );
}

criterion_group!(benches, parse_pages);
criterion_main!(benches);
