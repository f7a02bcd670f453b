//! Micro-benchmarks of reading endpoint load: parsing a real-size `/metrics` page with the engine
//! profiles. Every endpoint is polled every 50 ms, so this runs thousands of times a second in a
//! large fleet; the goal is under 50 µs for a busy vLLM page.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up may panic

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fleetpick_core::profile::{EngineKind, parse};
use fleetpick_sim::metrics::{Snapshot, render};
use fleetpick_sim::params::{EngineParams, MetricsFormat};

fn parse_pages(c: &mut Criterion) {
    let snap = Snapshot::busy_example();

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
