//! The picker reads the pages the simulator renders (two crates that share no code): every
//! field of a vLLM and an SGLang page, and never a panic on any cut or corruption of them.

use fleetpick_core::profile::{CacheConfig, EngineKind, LoadSample, LoraInfo, ProfileError, parse};
use fleetpick_sim::metrics::{Snapshot, render};
use fleetpick_sim::params::{EngineParams, MetricsFormat};
use fleetpick_sim::stats::{EngineGauges, Stats};

fn snapshot(running: usize, waiting: usize, kv_usage: f64) -> Snapshot {
    let mut stats = Stats::default();
    for i in 0..500 {
        let x = f64::from(i % 97) / 10.0;
        stats.ttft.observe(x);
        stats.itl.observe(x / 50.0);
        stats.e2e.observe(x * 3.0);
        stats.prompt_len.observe(f64::from(i * 7));
    }
    Snapshot {
        gauges: EngineGauges {
            running,
            waiting,
            kv_usage,
            running_adapters: vec!["sql-lora".into(), "chat-lora".into()],
            waiting_adapters: vec![],
        },
        stats,
        started_unix: 1.79e9,
        now_unix: 1.79e9 + 60.5,
    }
}

#[test]
fn reads_a_simulated_vllm_page() {
    let params = EngineParams::default();
    let page = render(&params, &snapshot(37, 4, 0.6137));
    let sample = parse(EngineKind::Vllm, &page).unwrap();
    assert_eq!(
        sample,
        LoadSample {
            waiting: 4,
            running: 37,
            kv_usage: 0.6137,
            cache: Some(CacheConfig {
                block_size: params.block_size,
                num_blocks: params.num_blocks,
            }),
            lora: Some(LoraInfo {
                running: vec!["sql-lora".into(), "chat-lora".into()],
                waiting: vec![],
                max_lora: params.max_lora,
            }),
        }
    );
}

#[test]
fn reads_a_simulated_sglang_page() {
    let params = EngineParams {
        metrics_format: MetricsFormat::Sglang,
        block_size: 32,
        num_blocks: 1000,
        ..EngineParams::default()
    };
    let page = render(&params, &snapshot(12, 0, 0.125));
    let sample = parse(EngineKind::Sglang, &page).unwrap();
    assert_eq!(
        sample,
        LoadSample {
            waiting: 0,
            running: 12,
            kv_usage: 0.125,
            cache: Some(CacheConfig {
                block_size: 32,
                num_blocks: 1000,
            }),
            lora: None,
        }
    );
    // The vLLM profile finds none of its series on an SGLang page.
    assert_eq!(
        parse(EngineKind::Vllm, &page),
        Err(ProfileError::Missing {
            engine: EngineKind::Vllm,
            series: "vllm:num_requests_waiting",
        })
    );
}

#[test]
fn never_panics_on_garbage_or_truncated_pages() {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let kinds = [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Trtllm,
        EngineKind::Triton,
    ];
    let vllm = render(&EngineParams::default(), &snapshot(3, 1, 0.5));
    let sglang = render(
        &EngineParams {
            metrics_format: MetricsFormat::Sglang,
            ..EngineParams::default()
        },
        &snapshot(3, 1, 0.5),
    );
    let triton = "nv_trt_llm_request_metrics{request_type=\"waiting\",model=\"a\\\"b\"} 2\n\
                  nv_trt_llm_request_metrics{request_type=\"scheduled\"} 6\n\
                  nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.25\n";
    let pages = [vllm.as_str(), sglang.as_str(), triton];

    // Truncations of every page (at character boundaries, as `&str` demands): every one of
    // the small page, every third one of the big pages (still all cuts inside each line kind).
    for page in pages {
        let step = if page.len() > 1000 { 3 } else { 1 };
        for cut in (0..=page.len())
            .step_by(step)
            .filter(|i| page.is_char_boundary(*i))
        {
            for kind in kinds {
                let _ = parse(kind, &page[..cut]);
            }
        }
    }

    // Random bytes, biased towards the characters the parser cares about.
    let alphabet = b"{}\"\\=, \t\r\n#0123456789.eE+-InfNaabc_:\xc3\xa9\xff";
    for _ in 0..3000 {
        let len = rng.usize(0..300);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.bool() {
                    alphabet[rng.usize(0..alphabet.len())]
                } else {
                    rng.u8(..)
                }
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        for kind in kinds {
            let _ = parse(kind, &text);
        }
    }

    // Real pages with random bytes replaced near the series the parser reads.
    for _ in 0..3000 {
        let page = pages[rng.usize(0..pages.len())];
        let mut bytes = page.as_bytes().to_vec();
        for _ in 0..rng.usize(1..8) {
            let at = rng.usize(0..bytes.len());
            bytes[at] = alphabet[rng.usize(0..alphabet.len())];
        }
        // Also splice a wanted name followed by garbage.
        let at = rng.usize(0..bytes.len());
        bytes.splice(
            at..at,
            b"\nvllm:lora_requests_info{max_lora=\"".iter().copied(),
        );
        let text = String::from_utf8_lossy(&bytes);
        for kind in kinds {
            let _ = parse(kind, &text);
        }
    }
}
