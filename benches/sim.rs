//! Micro-benchmarks of the simulator's hot spots: rendering `/metrics` and engine steps with a
//! full batch.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up may panic

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fleetpick::sim::engine::{Engine, FinishReason, SeqRequest};
use fleetpick::sim::metrics::{Snapshot, Stats, render};
use fleetpick::sim::params::{EngineParams, MetricsFormat};

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
    s.prefix_queries = 1_234_567;
    s.prefix_hits = 765_432;
    s
}

fn metrics_render(c: &mut Criterion) {
    let snap = Snapshot {
        gauges: fleetpick::sim::engine::EngineGauges {
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
    let vllm = EngineParams::default();
    let page_len = render(&vllm, &snap).len();
    c.bench_function(&format!("metrics/render_vllm ({page_len} bytes)"), |b| {
        b.iter(|| black_box(render(&vllm, black_box(&snap))))
    });
    let sglang = EngineParams {
        metrics_format: MetricsFormat::Sglang,
        ..EngineParams::default()
    };
    c.bench_function("metrics/render_sglang", |b| {
        b.iter(|| black_box(render(&sglang, black_box(&snap))))
    });
}

/// An engine with 128 sequences admitted and prefilled, decoding.
fn full_batch() -> (
    Engine,
    f64,
    Vec<tokio::sync::mpsc::UnboundedReceiver<fleetpick::sim::engine::SeqEvent>>,
) {
    let mut engine = Engine::new(EngineParams::default());
    let mut receivers = Vec::new();
    for i in 0..128u32 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        receivers.push(rx);
        engine.submit(
            SeqRequest {
                index: 0,
                prompt_tokens: 200,
                block_hashes: (0..12).map(|b| (u64::from(i) << 32) | b).collect(),
                max_tokens: 1000,
                finish_reason: FinishReason::Length,
                adapter: None,
                stream: false,
                events: tx,
            },
            0.0,
        );
    }
    let mut now = 0.0;
    for _ in 0..20 {
        if let Some(d) = engine.plan_step(now) {
            now += d;
            engine.complete_step(now);
        }
    }
    (engine, now, receivers)
}

fn engine_step(c: &mut Criterion) {
    // The bookkeeping of 50 decode steps of a full batch (128 sequences).
    c.bench_function("engine/50_steps_128_decoding", |b| {
        b.iter_batched(
            full_batch,
            |(mut engine, mut now, receivers)| {
                for _ in 0..50 {
                    if let Some(d) = engine.plan_step(now) {
                        now += d;
                        engine.complete_step(now);
                    }
                }
                (engine, receivers)
            },
            BatchSize::PerIteration,
        )
    });
}

criterion_group!(benches, metrics_render, engine_step);
criterion_main!(benches);
