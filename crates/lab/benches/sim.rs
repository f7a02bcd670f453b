//! Micro-benchmarks of the simulator's hot spots: rendering `/metrics` and engine steps with a
//! full batch.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up may panic

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fleetpick_sim::engine::{Engine, FinishReason, SeqRequest};
use fleetpick_sim::metrics::{Snapshot, render};
use fleetpick_sim::params::{EngineParams, MetricsFormat};

fn metrics_render(c: &mut Criterion) {
    let snap = Snapshot::busy_example();
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
    Vec<tokio::sync::mpsc::UnboundedReceiver<fleetpick_sim::engine::SeqEvent>>,
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
