//! The simulator's `/metrics` page: counters and histograms the engine keeps, rendered in the
//! Prometheus text format under vLLM's names (or SGLang's).
//!
//! The page is written by hand rather than through `prometheus-client` on purpose: the simulator
//! must reproduce another program's page (its exact names, label sets that change from one
//! scrape to the next like `vllm:lora_requests_info`, `_created` series and the Python process
//! collector's lines), not describe metrics of its own. fleetpick's own metrics use
//! `prometheus-client`. Histogram buckets are vLLM's, so the page is as large as a real one.

use std::fmt::Write;

use super::params::{EngineParams, MetricsFormat};
use super::stats::{EngineGauges, Histogram, Stats};

/// Everything one render needs, copied out of the engine so the engine lock is held briefly.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub gauges: EngineGauges,
    pub stats: Stats,
    /// Seconds since the Unix epoch when the server started (for `_created` series and
    /// `process_start_time_seconds`).
    pub started_unix: f64,
    /// Seconds since the Unix epoch now (the value of `vllm:lora_requests_info`).
    pub now_unix: f64,
}

impl Snapshot {
    /// A busy server's snapshot: 10,000 requests behind it (every histogram bucket holds a
    /// multi-digit count), 37 running, 4 waiting, 61% KV use, adapters running and waiting. The
    /// page benchmarks render and parse, as large as a real one that has been up for a while.
    pub fn busy_example() -> Snapshot {
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
        Snapshot {
            gauges: EngineGauges {
                running: 37,
                waiting: 4,
                kv_usage: 0.61,
                running_adapters: vec!["sql-lora".into(), "chat-lora".into()],
                waiting_adapters: vec!["tool-lora".into()],
            },
            stats: s,
            started_unix: 1.79e9,
            now_unix: 1.79e9 + 3600.0,
        }
    }
}

/// Renders the page for `format`.
pub fn render(params: &EngineParams, snap: &Snapshot) -> String {
    let mut out = String::with_capacity(48 * 1024);
    match params.metrics_format {
        MetricsFormat::Vllm => render_vllm(&mut out, params, snap),
        MetricsFormat::Sglang => render_sglang(&mut out, params, snap),
    }
    render_process(&mut out, snap);
    out
}

struct Page<'a> {
    out: &'a mut String,
    labels: String,
    created: f64,
}

impl Page<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name}{{{}}} {}", self.labels, fmt_f(v));
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name}_total{{{}}} {}.0", self.labels, v);
        let _ = writeln!(
            self.out,
            "{name}_created{{{}}} {}",
            self.labels,
            fmt_f(self.created)
        );
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let mut cumulative = 0;
        for (bound, count) in h.buckets() {
            cumulative += count;
            let _ = writeln!(
                self.out,
                "{name}_bucket{{{},le=\"{}\"}} {}.0",
                self.labels,
                fmt_f(bound),
                cumulative
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{{{},le=\"+Inf\"}} {}.0",
            self.labels,
            h.count()
        );
        let _ = writeln!(self.out, "{name}_count{{{}}} {}.0", self.labels, h.count());
        let _ = writeln!(self.out, "{name}_sum{{{}}} {}", self.labels, fmt_f(h.sum()));
        let _ = writeln!(
            self.out,
            "{name}_created{{{}}} {}",
            self.labels,
            fmt_f(self.created)
        );
    }
}

/// Formats like Python's `repr(float)` does for the values on a metrics page: integral values
/// keep a `.0`.
fn fmt_f(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn join(adapters: &[std::sync::Arc<str>]) -> String {
    adapters.iter().map(|a| &**a).collect::<Vec<_>>().join(",")
}

fn render_vllm(out: &mut String, p: &EngineParams, snap: &Snapshot) {
    let s = &snap.stats;
    let g = &snap.gauges;
    let mut page = Page {
        out,
        labels: format!("engine=\"0\",model_name=\"{}\"", p.model),
        created: snap.started_unix,
    };
    page.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        g.running as f64,
    );
    page.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        g.waiting as f64,
    );
    page.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        g.kv_usage,
    );
    page.gauge(
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
        g.kv_usage,
    );
    page.counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        s.prefix_queries,
    );
    page.counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        s.prefix_hits,
    );
    page.counter(
        "vllm:gpu_prefix_cache_queries",
        "GPU prefix cache queries. DEPRECATED.",
        s.prefix_queries,
    );
    page.counter(
        "vllm:gpu_prefix_cache_hits",
        "GPU prefix cache hits. DEPRECATED.",
        s.prefix_hits,
    );
    page.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        s.preemptions,
    );
    page.counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        s.prompt_tokens,
    );
    page.counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        s.generation_tokens,
    );
    page.header(
        "vllm:request_success",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, v) in [
        ("stop", s.success_stop),
        ("length", s.success_length),
        ("abort", s.aborted),
    ] {
        let _ = writeln!(
            page.out,
            "vllm:request_success_total{{{},finished_reason=\"{reason}\"}} {v}.0",
            page.labels
        );
    }
    page.histogram(
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        &s.iteration_tokens,
    );
    page.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &s.ttft,
    );
    page.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &s.itl,
    );
    page.histogram(
        "vllm:time_per_output_token_seconds",
        "Histogram of time per output token in seconds. DEPRECATED: use vllm:inter_token_latency_seconds.",
        &s.tpot,
    );
    page.histogram(
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        &s.tpot,
    );
    page.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &s.e2e,
    );
    page.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &s.queue_time,
    );
    page.histogram(
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        &s.inference_time,
    );
    page.histogram(
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        &s.prefill_time,
    );
    page.histogram(
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        &s.decode_time,
    );
    page.histogram(
        "vllm:request_prompt_tokens",
        "Number of prefill tokens processed.",
        &s.prompt_len,
    );
    page.histogram(
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
        &s.generation_len,
    );
    page.histogram(
        "vllm:request_max_num_generation_tokens",
        "Histogram of maximum number of requested generation tokens.",
        &s.generation_len,
    );

    page.header(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let _ = writeln!(
        page.out,
        "vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"sha256\"}} 1.0",
        p.block_size, p.num_blocks
    );
    page.header(
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on lora requests.",
    );
    let _ = writeln!(
        page.out,
        "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
        p.max_lora,
        join(&g.running_adapters),
        join(&g.waiting_adapters),
        fmt_f(snap.now_unix)
    );
}

fn render_sglang(out: &mut String, p: &EngineParams, snap: &Snapshot) {
    let s = &snap.stats;
    let g = &snap.gauges;
    let mut page = Page {
        out,
        labels: format!("model_name=\"{}\"", p.model),
        created: snap.started_unix,
    };
    page.gauge(
        "sglang:num_running_reqs",
        "The number of running requests.",
        g.running as f64,
    );
    page.gauge(
        "sglang:num_queue_reqs",
        "The number of requests in the waiting queue.",
        g.waiting as f64,
    );
    page.gauge("sglang:token_usage", "The token usage.", g.kv_usage);
    let hit_rate = if s.prefix_queries == 0 {
        0.0
    } else {
        s.prefix_hits as f64 / s.prefix_queries as f64
    };
    page.gauge(
        "sglang:cache_hit_rate",
        "The prefix cache hit rate.",
        hit_rate,
    );
    page.gauge(
        "sglang:num_used_tokens",
        "The number of used tokens.",
        (g.kv_usage * f64::from(p.num_blocks * p.block_size)).round(),
    );
    page.counter(
        "sglang:prompt_tokens",
        "Number of prefill tokens processed.",
        s.prompt_tokens,
    );
    page.counter(
        "sglang:generation_tokens",
        "Number of generation tokens processed.",
        s.generation_tokens,
    );
    page.counter(
        "sglang:cached_tokens",
        "Number of cached prompt tokens.",
        s.prefix_hits,
    );
    page.counter(
        "sglang:num_requests",
        "Number of requests processed.",
        s.success_length + s.success_stop,
    );
    page.histogram(
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &s.ttft,
    );
    page.histogram(
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &s.itl,
    );
    page.histogram(
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        &s.e2e,
    );
    page.histogram(
        "sglang:queue_time_seconds",
        "Histogram of queueing time in seconds.",
        &s.queue_time,
    );
    page.header(
        "sglang:cache_config_info",
        "gauge",
        "Information of the cache config",
    );
    let _ = writeln!(
        page.out,
        "sglang:cache_config_info{{num_pages=\"{}\",page_size=\"{}\"}} 1.0",
        p.num_blocks, p.block_size
    );
}

/// The Python process collector's lines, which every real page carries.
fn render_process(out: &mut String, snap: &Snapshot) {
    let uptime = (snap.now_unix - snap.started_unix).max(0.0);
    let _ = write!(
        out,
        "# HELP python_gc_objects_collected_total Objects collected during gc\n\
         # TYPE python_gc_objects_collected_total counter\n\
         python_gc_objects_collected_total{{generation=\"0\"}} 12874.0\n\
         python_gc_objects_collected_total{{generation=\"1\"}} 3101.0\n\
         python_gc_objects_collected_total{{generation=\"2\"}} 521.0\n\
         # HELP python_info Python platform information\n\
         # TYPE python_info gauge\n\
         python_info{{implementation=\"CPython\",major=\"3\",minor=\"12\",patchlevel=\"8\",version=\"3.12.8\"}} 1.0\n\
         # HELP process_virtual_memory_bytes Virtual memory size in bytes.\n\
         # TYPE process_virtual_memory_bytes gauge\n\
         process_virtual_memory_bytes 5.4624e+10\n\
         # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes 4.1e+09\n\
         # HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
         # TYPE process_start_time_seconds gauge\n\
         process_start_time_seconds {}\n\
         # HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {}\n",
        fmt_f(snap.started_unix),
        fmt_f((uptime * 0.9 * 100.0).round() / 100.0),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut stats = Stats::default();
        stats.ttft.observe(0.03);
        stats.ttft.observe(3.0);
        stats.prefix_queries = 100;
        stats.prefix_hits = 40;
        Snapshot {
            gauges: EngineGauges {
                running: 3,
                waiting: 2,
                kv_usage: 0.25,
                running_adapters: vec!["a".into(), "b".into()],
                waiting_adapters: vec![],
            },
            stats,
            started_unix: 1.7e9,
            now_unix: 1.7e9 + 5.0,
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let page = render(&EngineParams::default(), &snapshot());
        assert!(page.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\",le=\"0.04\"} 1.0"), "{page}");
        assert!(page.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\",le=\"+Inf\"} 2.0"));
        assert!(page.contains("vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 2.0"));
    }

    #[test]
    fn vllm_page_has_the_names_a_picker_reads() {
        let page = render(&EngineParams::default(), &snapshot());
        for needle in [
            "vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 3.0",
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 2.0",
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.25",
            "vllm:gpu_cache_usage_perc{",
            "vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 40.0",
            "vllm:prefix_cache_queries_total{",
            "running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"",
            "max_lora=\"4\"",
            "num_gpu_blocks=\"2048\"",
            "block_size=\"16\"",
        ] {
            assert!(page.contains(needle), "missing {needle}");
        }
        // As large as a real page: tens of kilobytes.
        assert!(page.len() > 20_000, "page is {} bytes", page.len());
    }

    #[test]
    fn sglang_page_uses_sglang_names() {
        let p = EngineParams {
            metrics_format: MetricsFormat::Sglang,
            ..EngineParams::default()
        };
        let page = render(&p, &snapshot());
        assert!(page.contains(
            "sglang:num_queue_reqs{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 2.0"
        ));
        assert!(page.contains("sglang:num_running_reqs{"));
        assert!(
            page.contains(
                "sglang:token_usage{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.25"
            )
        );
        assert!(page.contains("sglang:cache_config_info{num_pages=\"2048\",page_size=\"16\"} 1.0"));
        assert!(!page.contains("vllm:"));
    }
}
