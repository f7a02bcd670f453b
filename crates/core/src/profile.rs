//! Engine profiles: which Prometheus series each model-server engine (vLLM, SGLang,
//! trtllm-serve, Triton with the TensorRT-LLM backend) exposes for its load, and the parser that
//! turns one `/metrics` page into a [`LoadSample`].
//!
//! This module owns the mapping from engine to series names (the `VLLM`, `SGLANG`, `TRTLLM` and
//! `TRITON` tables below) and the reading of those series; it does no I/O. The poller fetches
//! the page and hands the text to [`parse`].
//!
//! # Why only some series
//! The picker needs four things per endpoint: queued requests, running requests, KV-cache use,
//! and (where the engine says so) its cache geometry and loaded LoRA adapters. A real vLLM page is
//! tens of kilobytes, almost all of it histogram buckets the picker never looks at, and every
//! endpoint is polled every 50 ms. So [`parse`] is not a general Prometheus parser: it walks the
//! page line by line, drops comment lines on their first byte, and drops every other line after
//! comparing its start with the handful of names the engine's profile lists (one byte test, then
//! a short compare), without allocating. Only the lines it keeps get their labels and value
//! parsed, and those are parsed properly (escaped quotes, commas inside values, labels in any
//! order, optional timestamps, `+Inf`/`NaN`).
//!
//! # Rules
//! - Waiting, running and KV use are required: a page without them is an error naming the missing
//!   series. Cache geometry and LoRA info are optional, and a malformed optional sample is dropped
//!   rather than failing the page.
//! - A series with several samples (several label sets, e.g. several `model_name` values) has its
//!   waiting and running counts summed and the largest KV use taken.
//! - Counts are read as floats and rounded (NaN and negatives count as 0). KV use is clamped into
//!   `0..=1`, NaN counting as 0.
//! - `vllm:lora_requests_info` carries a timestamp as its value and may appear with several label
//!   sets: the sample with the largest value wins.

use std::borrow::Cow;

pub use fleetpick_protocol::EngineKind;

/// One endpoint's load, read from one `/metrics` page.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadSample {
    /// Requests queued.
    pub waiting: u32,
    /// Requests in the batch.
    pub running: u32,
    /// KV-cache use, `0..=1`.
    pub kv_usage: f64,
    /// From `vllm:cache_config_info{block_size,num_gpu_blocks}` or
    /// `sglang:cache_config_info{page_size,num_pages}`.
    pub cache: Option<CacheConfig>,
    /// From `vllm:lora_requests_info{running_lora_adapters,waiting_lora_adapters,max_lora}`.
    pub lora: Option<LoraInfo>,
}

/// The KV cache's geometry: tokens per block and blocks on the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub block_size: u32,
    pub num_blocks: u32,
}

/// The LoRA adapters an engine is running and waiting for, and how many it can hold at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoraInfo {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    pub max_lora: u32,
}

/// Why a page gave no [`LoadSample`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    /// A required series has no sample on the page.
    #[error("{engine} /metrics page has no `{series}` sample")]
    Missing {
        engine: EngineKind,
        series: &'static str,
    },
    /// A sample of a required series could not be read (broken label set or value).
    #[error("{engine} /metrics page has a malformed `{series}` sample on line {line}")]
    Malformed {
        engine: EngineKind,
        series: &'static str,
        /// 1-based line number on the page.
        line: usize,
    },
}

/// What a kept sample contributes to.
#[derive(Debug, Clone, Copy)]
enum Role {
    Waiting,
    Running,
    Kv,
    /// vLLM's older `vllm:gpu_cache_usage_perc`, used only when the new name is absent.
    KvLegacy,
}

/// How the samples of one series are read.
#[derive(Debug)]
enum Reading {
    /// The value, whatever the labels.
    Value(Role),
    /// The value, routed by one label's value; samples with other values are ignored.
    ByLabel {
        label: &'static str,
        routes: &'static [(&'static str, Role)],
    },
    /// Cache geometry from two labels; the value is ignored.
    CacheInfo {
        block_size: &'static str,
        num_blocks: &'static str,
    },
    /// vLLM's LoRA info; the value is a timestamp.
    LoraInfo,
}

#[derive(Debug)]
struct Series {
    name: &'static str,
    reading: Reading,
}

/// One engine's series, and the names reported when a required one is missing.
#[derive(Debug)]
struct Profile {
    series: &'static [Series],
    waiting: &'static str,
    running: &'static str,
    kv: &'static str,
}

const VLLM: Profile = Profile {
    series: &[
        Series {
            name: "vllm:num_requests_waiting",
            reading: Reading::Value(Role::Waiting),
        },
        Series {
            name: "vllm:num_requests_running",
            reading: Reading::Value(Role::Running),
        },
        Series {
            name: "vllm:kv_cache_usage_perc",
            reading: Reading::Value(Role::Kv),
        },
        Series {
            name: "vllm:gpu_cache_usage_perc",
            reading: Reading::Value(Role::KvLegacy),
        },
        Series {
            name: "vllm:cache_config_info",
            reading: Reading::CacheInfo {
                block_size: "block_size",
                num_blocks: "num_gpu_blocks",
            },
        },
        Series {
            name: "vllm:lora_requests_info",
            reading: Reading::LoraInfo,
        },
    ],
    waiting: "vllm:num_requests_waiting",
    running: "vllm:num_requests_running",
    kv: "vllm:kv_cache_usage_perc",
};

const SGLANG: Profile = Profile {
    series: &[
        Series {
            name: "sglang:num_queue_reqs",
            reading: Reading::Value(Role::Waiting),
        },
        Series {
            name: "sglang:num_running_reqs",
            reading: Reading::Value(Role::Running),
        },
        Series {
            name: "sglang:token_usage",
            reading: Reading::Value(Role::Kv),
        },
        Series {
            name: "sglang:cache_config_info",
            reading: Reading::CacheInfo {
                block_size: "page_size",
                num_blocks: "num_pages",
            },
        },
    ],
    waiting: "sglang:num_queue_reqs",
    running: "sglang:num_running_reqs",
    kv: "sglang:token_usage",
};

const TRTLLM: Profile = Profile {
    series: &[
        Series {
            name: "trtllm_num_requests_waiting",
            reading: Reading::Value(Role::Waiting),
        },
        Series {
            name: "trtllm_num_requests_running",
            reading: Reading::Value(Role::Running),
        },
        Series {
            name: "trtllm_kv_cache_utilization",
            reading: Reading::Value(Role::Kv),
        },
    ],
    waiting: "trtllm_num_requests_waiting",
    running: "trtllm_num_requests_running",
    kv: "trtllm_kv_cache_utilization",
};

const TRITON: Profile = Profile {
    series: &[
        Series {
            name: "nv_trt_llm_request_metrics",
            reading: Reading::ByLabel {
                label: "request_type",
                routes: &[("waiting", Role::Waiting), ("scheduled", Role::Running)],
            },
        },
        Series {
            name: "nv_trt_llm_kv_cache_block_metrics",
            reading: Reading::ByLabel {
                label: "kv_cache_block_type",
                routes: &[("fraction", Role::Kv)],
            },
        },
    ],
    waiting: "nv_trt_llm_request_metrics{request_type=\"waiting\"}",
    running: "nv_trt_llm_request_metrics{request_type=\"scheduled\"}",
    kv: "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"}",
};

fn profile(kind: EngineKind) -> &'static Profile {
    match kind {
        EngineKind::Vllm => &VLLM,
        EngineKind::Sglang => &SGLANG,
        EngineKind::Trtllm => &TRTLLM,
        EngineKind::Triton => &TRITON,
    }
}

/// The LoRA sample kept so far, still borrowed from the page.
struct LoraRaw<'a> {
    /// The sample's value (a timestamp), NaN read as minus infinity.
    key: f64,
    running: Option<&'a str>,
    waiting: Option<&'a str>,
    max_lora: Option<&'a str>,
}

/// The running totals while the page is read.
#[derive(Default)]
struct Totals<'a> {
    waiting: Option<u32>,
    running: Option<u32>,
    kv: Option<f64>,
    kv_legacy: Option<f64>,
    cache: Option<CacheConfig>,
    lora: Option<LoraRaw<'a>>,
}

impl Totals<'_> {
    fn add(&mut self, role: Role, v: f64) {
        match role {
            Role::Waiting => {
                self.waiting = Some(self.waiting.unwrap_or(0).saturating_add(count(v)))
            }
            Role::Running => {
                self.running = Some(self.running.unwrap_or(0).saturating_add(count(v)))
            }
            Role::Kv => self.kv = Some(self.kv.unwrap_or(0.0).max(fraction(v))),
            Role::KvLegacy => {
                self.kv_legacy = Some(self.kv_legacy.unwrap_or(0.0).max(fraction(v)));
            }
        }
    }
}

/// Reads the load of a `kind` engine from its `/metrics` page.
///
/// Only the engine's series are read; everything else on the page is skipped. Never panics,
/// whatever the input.
pub fn parse(kind: EngineKind, page: &str) -> Result<LoadSample, ProfileError> {
    let profile = profile(kind);
    let mut totals = Totals::default();
    for (index, line) in page.split('\n').enumerate() {
        let Some(&first) = line.as_bytes().first() else {
            continue;
        };
        if first == b'#' {
            continue;
        }
        let line = if first == b' ' || first == b'\t' {
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.starts_with('#') {
                continue;
            }
            trimmed
        } else {
            line
        };
        for series in profile.series {
            let Some(rest) = after_name(line, series.name) else {
                continue;
            };
            let malformed = || ProfileError::Malformed {
                engine: kind,
                series: series.name,
                line: index + 1,
            };
            read_sample(&series.reading, rest, &mut totals).ok_or_else(malformed)?;
            break;
        }
    }

    let missing = |series| ProfileError::Missing {
        engine: kind,
        series,
    };
    let waiting = totals.waiting.ok_or_else(|| missing(profile.waiting))?;
    let running = totals.running.ok_or_else(|| missing(profile.running))?;
    let kv_usage = totals
        .kv
        .or(totals.kv_legacy)
        .ok_or_else(|| missing(profile.kv))?;
    Ok(LoadSample {
        waiting,
        running,
        kv_usage,
        cache: totals.cache,
        lora: totals.lora.map(|raw| LoraInfo {
            running: adapters(raw.running),
            waiting: adapters(raw.waiting),
            max_lora: raw
                .max_lora
                .and_then(|m| unescape(m).trim().parse().ok())
                .unwrap_or(0),
        }),
    })
}

/// Reads one sample of a kept series into `totals`. `None` when a required sample is malformed;
/// malformed optional samples are dropped and give `Some`.
fn read_sample<'a>(reading: &Reading, rest: &'a str, totals: &mut Totals<'a>) -> Option<()> {
    match reading {
        Reading::Value(role) => {
            let ([], value) = labels_and_value(rest, [])?;
            totals.add(*role, value);
        }
        Reading::ByLabel { label, routes } => {
            let ([found], value) = labels_and_value(rest, [label])?;
            if let Some(found) = found {
                let found = unescape(found);
                if let Some((_, role)) = routes.iter().find(|(want, _)| *want == found) {
                    totals.add(*role, value);
                }
            }
        }
        Reading::CacheInfo {
            block_size,
            num_blocks,
        } => {
            if totals.cache.is_none()
                && let Some(([Some(size), Some(blocks)], _)) =
                    labels_and_value(rest, [block_size, num_blocks])
                && let (Ok(block_size), Ok(num_blocks)) = (
                    unescape(size).trim().parse(),
                    unescape(blocks).trim().parse(),
                )
            {
                totals.cache = Some(CacheConfig {
                    block_size,
                    num_blocks,
                });
            }
        }
        Reading::LoraInfo => {
            if let Some(([running, waiting, max_lora], value)) = labels_and_value(
                rest,
                ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            ) {
                let key = if value.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    value
                };
                if totals.lora.as_ref().is_none_or(|best| key > best.key) {
                    totals.lora = Some(LoraRaw {
                        key,
                        running,
                        waiting,
                        max_lora,
                    });
                }
            }
        }
    }
    Some(())
}

/// If `line` is a sample of `name`, the rest of the line after the name.
#[inline]
fn after_name<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let bytes = line.as_bytes();
    let n = name.len();
    // The cheap test first: most skipped lines fail it without comparing the names.
    if !matches!(bytes.get(n), Some(b'{' | b' ' | b'\t')) || &bytes[..n] != name.as_bytes() {
        return None;
    }
    // `bytes[n]` is ASCII, so `n` is a character boundary.
    line.get(n..)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|b| is_space(*b)) {
        i += 1;
    }
    i
}

/// Parses what follows a sample's name: an optional label set, then the value (then an optional
/// timestamp or exemplar, ignored). Returns the raw (still escaped) values of the `wanted` labels
/// and the sample's value. `None` if the label set or the value is malformed.
fn labels_and_value<'a, const N: usize>(
    rest: &'a str,
    wanted: [&str; N],
) -> Option<([Option<&'a str>; N], f64)> {
    let bytes = rest.as_bytes();
    let mut found = [None; N];
    let mut i = skip_spaces(bytes, 0);
    if bytes.get(i) == Some(&b'{') {
        i += 1;
        loop {
            i = skip_spaces(bytes, i);
            if *bytes.get(i)? == b'}' {
                i += 1;
                break;
            }
            let name_start = i;
            while bytes
                .get(i)
                .is_some_and(|b| !matches!(b, b'=' | b'"' | b',' | b'{' | b'}') && !is_space(*b))
            {
                i += 1;
            }
            if i == name_start {
                return None;
            }
            let name = rest.get(name_start..i)?;
            i = skip_spaces(bytes, i);
            if *bytes.get(i)? != b'=' {
                return None;
            }
            i = skip_spaces(bytes, i + 1);
            if *bytes.get(i)? != b'"' {
                return None;
            }
            i += 1;
            let value_start = i;
            loop {
                match *bytes.get(i)? {
                    b'\\' => i += 2,
                    b'"' => break,
                    _ => i += 1,
                }
            }
            let value = rest.get(value_start..i)?;
            i += 1;
            for (slot, want) in found.iter_mut().zip(wanted) {
                if name == want {
                    *slot = Some(value);
                }
            }
            i = skip_spaces(bytes, i);
            match *bytes.get(i)? {
                b',' => i += 1,
                b'}' => {}
                _ => return None,
            }
        }
    }
    let start = skip_spaces(bytes, i);
    let mut end = start;
    while bytes.get(end).is_some_and(|b| !is_space(*b)) {
        end += 1;
    }
    let value = rest.get(start..end)?.parse::<f64>().ok()?;
    Some((found, value))
}

/// A label value with its escapes (`\\`, `\"`, `\n`) resolved; borrowed when it has none.
fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// A comma-separated adapter list (`""` is empty).
fn adapters(raw: Option<&str>) -> Vec<String> {
    let Some(raw) = raw else {
        return Vec::new();
    };
    unescape(raw)
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A count from a float sample: rounded, NaN and negatives as 0, saturating.
fn count(v: f64) -> u32 {
    // `as` saturates and maps NaN to 0.
    v.round() as u32
}

/// A fraction from a float sample: clamped into `0..=1`, NaN as 0.
fn fraction(v: f64) -> f64 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_trtllm_serve_page() {
        let page = "\
# HELP trtllm_num_requests_waiting Number of requests waiting.
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name=\"llama\",engine_type=\"trtllm\"} 3
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{model_name=\"llama\",engine_type=\"trtllm\"} 1e1
trtllm_num_requests_running_total{model_name=\"llama\"} 999
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{model_name=\"llama\",engine_type=\"trtllm\"} 4.5e-1
trtllm_kv_cache_hit_rate{model_name=\"llama\"} 0.9
";
        let sample = parse(EngineKind::Trtllm, page).unwrap();
        assert_eq!(
            sample,
            LoadSample {
                waiting: 3,
                running: 10,
                kv_usage: 0.45,
                cache: None,
                lora: None,
            }
        );
    }

    #[test]
    fn reads_a_triton_page() {
        let page = "\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"context\",version=\"1\"} 1
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"scheduled\",version=\"1\"} 6
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"max\",version=\"1\"} 512
nv_trt_llm_request_metrics{request_type=\"waiting\",model=\"tensorrt_llm\",version=\"1\"} 2
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"active\",version=\"1\"} 8
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"tensorrt_llm\",version=\"1\"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\",model=\"tensorrt_llm\",version=\"1\"} 1024
nv_trt_llm_kv_cache_block_metrics{model=\"tensorrt_llm\",version=\"1\",kv_cache_block_type=\"fraction\"} 0.25
nv_inference_count{model=\"tensorrt_llm\",version=\"1\"} 77
";
        let sample = parse(EngineKind::Triton, page).unwrap();
        assert_eq!(
            sample,
            LoadSample {
                waiting: 2,
                running: 6,
                kv_usage: 0.25,
                cache: None,
                lora: None,
            }
        );
    }

    #[test]
    fn triton_names_the_missing_label_selector() {
        let page = "\
nv_trt_llm_request_metrics{model=\"m\",request_type=\"scheduled\"} 6
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.5
";
        let err = parse(EngineKind::Triton, page).unwrap_err();
        assert_eq!(
            err,
            ProfileError::Missing {
                engine: EngineKind::Triton,
                series: "nv_trt_llm_request_metrics{request_type=\"waiting\"}",
            }
        );
        assert_eq!(
            err.to_string(),
            "triton /metrics page has no `nv_trt_llm_request_metrics{request_type=\"waiting\"}` sample"
        );
    }

    #[test]
    fn label_order_and_escapes_do_not_matter() {
        // The first sample's `model` value contains text that looks like the wanted label.
        let page = "\
nv_trt_llm_request_metrics{model=\"a\\\"b,request_type=\\\"waiting\\\"\",request_type=\"scheduled\"} 5
nv_trt_llm_request_metrics{ request_type = \"waiting\" , model=\"x}y\" , } 7 1712345678000
nv_trt_llm_kv_cache_block_metrics{version=\"1\",kv_cache_block_type=\"fraction\",model=\"m\"} 0.5
";
        let sample = parse(EngineKind::Triton, page).unwrap();
        assert_eq!((sample.waiting, sample.running), (7, 5));
        assert_eq!(sample.kv_usage, 0.5);

        let swapped = "\
vllm:num_requests_running{model_name=\"m\",engine=\"0\"} 1
vllm:num_requests_waiting{model_name=\"m\",engine=\"0\"} 2
vllm:kv_cache_usage_perc{model_name=\"m\",engine=\"0\"} 0.3
vllm:cache_config_info{num_gpu_blocks=\"100\",engine=\"0\",block_size=\"64\"} 1.0
vllm:lora_requests_info{waiting_lora_adapters=\"w\",max_lora=\"2\",running_lora_adapters=\"r\\\"1,r2\"} 5.0
";
        let sample = parse(EngineKind::Vllm, swapped).unwrap();
        assert_eq!(
            sample.cache,
            Some(CacheConfig {
                block_size: 64,
                num_blocks: 100
            })
        );
        assert_eq!(
            sample.lora,
            Some(LoraInfo {
                running: vec!["r\"1".into(), "r2".into()],
                waiting: vec!["w".into()],
                max_lora: 2,
            })
        );
    }

    #[test]
    fn vllm_falls_back_to_gpu_cache_usage_perc() {
        let old = "\
vllm:num_requests_running{model_name=\"m\"} 1.0
vllm:num_requests_waiting{model_name=\"m\"} 0.0
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.75
";
        assert_eq!(parse(EngineKind::Vllm, old).unwrap().kv_usage, 0.75);
        // Both present: the new name wins, wherever it appears.
        let both = format!("{old}vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.5\n");
        assert_eq!(parse(EngineKind::Vllm, &both).unwrap().kv_usage, 0.5);
        let neither = "\
vllm:num_requests_running{model_name=\"m\"} 1.0
vllm:num_requests_waiting{model_name=\"m\"} 0.0
";
        assert_eq!(
            parse(EngineKind::Vllm, neither),
            Err(ProfileError::Missing {
                engine: EngineKind::Vllm,
                series: "vllm:kv_cache_usage_perc",
            })
        );
    }

    #[test]
    fn missing_required_series_are_named() {
        let cases = [
            (EngineKind::Vllm, "", "vllm:num_requests_waiting"),
            (
                EngineKind::Vllm,
                "vllm:num_requests_waiting 1\n",
                "vllm:num_requests_running",
            ),
            (
                EngineKind::Sglang,
                "sglang:num_queue_reqs 1\nsglang:num_running_reqs 2\n",
                "sglang:token_usage",
            ),
            (
                EngineKind::Trtllm,
                "trtllm_num_requests_waiting 0\n",
                "trtllm_num_requests_running",
            ),
            (
                EngineKind::Triton,
                "nv_trt_llm_request_metrics{request_type=\"waiting\"} 1\n\
                 nv_trt_llm_request_metrics{request_type=\"scheduled\"} 1\n\
                 nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\"} 10\n",
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"}",
            ),
        ];
        for (engine, page, series) in cases {
            let err = parse(engine, page).unwrap_err();
            assert_eq!(err, ProfileError::Missing { engine, series }, "{page}");
            let text = err.to_string();
            assert!(
                text.contains(engine.as_str()) && text.contains(series),
                "{text}"
            );
        }
        // A longer name that starts with a wanted one is a different series.
        let page = "\
vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 3
vllm:num_requests_running 1
vllm:kv_cache_usage_perc 0.1
";
        assert_eq!(
            parse(EngineKind::Vllm, page).unwrap_err(),
            ProfileError::Missing {
                engine: EngineKind::Vllm,
                series: "vllm:num_requests_waiting",
            }
        );
    }

    #[test]
    fn sums_counts_and_takes_the_largest_kv_across_label_sets() {
        let page = "\
# HELP vllm:num_requests_waiting Number of requests waiting.
vllm:num_requests_waiting{engine=\"0\",model_name=\"a\"} 3.0
vllm:num_requests_waiting{engine=\"1\",model_name=\"b\"} 4.0
vllm:num_requests_running{engine=\"0\",model_name=\"a\"} 10.0
vllm:num_requests_running{engine=\"1\",model_name=\"b\"} 2.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"a\"} 0.4
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"b\"} 0.7
";
        let sample = parse(EngineKind::Vllm, page).unwrap();
        assert_eq!((sample.waiting, sample.running), (7, 12));
        assert_eq!(sample.kv_usage, 0.7);
        assert_eq!((sample.cache, sample.lora), (None, None));
    }

    #[test]
    fn value_spellings() {
        let page = |w: &str, r: &str, kv: &str| {
            format!(
                "sglang:num_queue_reqs{{model_name=\"m\"}} {w}\nsglang:num_running_reqs {r}\r\nsglang:token_usage\t{kv} 1712345678000\n"
            )
        };
        let read = |w, r, kv| {
            let s = parse(EngineKind::Sglang, &page(w, r, kv)).unwrap();
            (s.waiting, s.running, s.kv_usage)
        };
        assert_eq!(read("1.0", "3", "1e-3"), (1, 3, 0.001));
        assert_eq!(read("2.6", "+3", "+Inf"), (3, 3, 1.0));
        assert_eq!(read("NaN", "-Inf", "NaN"), (0, 0, 0.0));
        assert_eq!(read("-4", "+Inf", "-0.5"), (0, u32::MAX, 0.0));
        assert_eq!(read("1e12", "0", "1.5"), (u32::MAX, 0, 1.0));
        assert_eq!(
            parse(EngineKind::Sglang, &page("1", "2", "lots")),
            Err(ProfileError::Malformed {
                engine: EngineKind::Sglang,
                series: "sglang:token_usage",
                line: 3,
            })
        );
    }

    #[test]
    fn lora_info_takes_the_latest_sample() {
        let base = "\
vllm:num_requests_waiting 0
vllm:num_requests_running 0
vllm:kv_cache_usage_perc 0
";
        let page = format!(
            "{base}\
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"}} 1.7e9
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\"}} 1.700000002e9
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"older\",waiting_lora_adapters=\"\"}} 1.6e9
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"nan\",waiting_lora_adapters=\"\"}} NaN
"
        );
        assert_eq!(
            parse(EngineKind::Vllm, &page).unwrap().lora,
            Some(LoraInfo {
                running: vec!["a".into(), "b".into()],
                waiting: vec!["c".into()],
                max_lora: 4,
            })
        );
        let empty = format!(
            "{base}vllm:lora_requests_info{{max_lora=\"1\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} 5\n"
        );
        assert_eq!(
            parse(EngineKind::Vllm, &empty).unwrap().lora,
            Some(LoraInfo {
                running: vec![],
                waiting: vec![],
                max_lora: 1
            })
        );
        // Optional samples that cannot be read are dropped, not fatal.
        let broken = format!(
            "{base}vllm:lora_requests_info{{max_lora=\"1\",running_lora_adapters=\"x}} 5\n\
             vllm:cache_config_info{{block_size=\"None\",num_gpu_blocks=\"10\"}} 1.0\n"
        );
        let sample = parse(EngineKind::Vllm, &broken).unwrap();
        assert_eq!((sample.lora, sample.cache), (None, None));
    }

    #[test]
    fn cache_config_parsing() {
        let vllm = "\
vllm:num_requests_waiting 0
vllm:num_requests_running 0
vllm:kv_cache_usage_perc 0
vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",num_cpu_blocks=\"None\",num_gpu_blocks=\"2048\"} 1.0
";
        assert_eq!(
            parse(EngineKind::Vllm, vllm).unwrap().cache,
            Some(CacheConfig {
                block_size: 16,
                num_blocks: 2048
            })
        );
        let sglang = "\
sglang:num_queue_reqs 0
sglang:num_running_reqs 0
sglang:token_usage 0
sglang:cache_config_info{page_size=\"1\",num_pages=\"300000\"} 1.0
";
        assert_eq!(
            parse(EngineKind::Sglang, sglang).unwrap().cache,
            Some(CacheConfig {
                block_size: 1,
                num_blocks: 300_000
            })
        );
        // vLLM's label names mean nothing to the SGLang profile.
        let mixed = sglang.replace(
            "sglang:cache_config_info{page_size",
            "sglang:cache_config_info{block_size",
        );
        assert_eq!(parse(EngineKind::Sglang, &mixed).unwrap().cache, None);
    }

    #[test]
    fn comments_blank_lines_and_indentation_are_skipped() {
        let page = "\n\
# vllm:num_requests_waiting 99\n\
   # vllm:num_requests_running 99\n\
\n\
  vllm:num_requests_waiting 1\n\
vllm:num_requests_running{} 2\n\
vllm:kv_cache_usage_perc{engine=\"0\"} 0.5";
        let sample = parse(EngineKind::Vllm, page).unwrap();
        assert_eq!(
            (sample.waiting, sample.running, sample.kv_usage),
            (1, 2, 0.5)
        );
    }

    #[test]
    fn malformed_required_samples_are_errors() {
        for (bad, line) in [
            ("vllm:num_requests_waiting{engine=\"0\" 1", 1),
            ("vllm:num_requests_waiting{engine=0} 1", 1),
            ("vllm:num_requests_waiting{engine=\"0\"}", 1),
            ("vllm:num_requests_waiting{=\"0\"} 1", 1),
            ("vllm:num_requests_waiting{engine=\"0\"", 1),
            (
                "vllm:num_requests_waiting 1 2\nvllm:num_requests_running x",
                2,
            ),
        ] {
            assert_eq!(
                parse(EngineKind::Vllm, bad),
                Err(ProfileError::Malformed {
                    engine: EngineKind::Vllm,
                    series: if line == 1 {
                        "vllm:num_requests_waiting"
                    } else {
                        "vllm:num_requests_running"
                    },
                    line,
                }),
                "{bad}"
            );
        }
    }
}
