//! Engine parameters of one simulated server, and the simulator's YAML config file that sets
//! them per cluster and per server for heterogeneous fleets.
//!
//! Precedence, lowest first: built-in defaults ([`EngineParams::default`]), the file's
//! `defaults`, `clusters.<name>.engine`, `servers.<name>`. Every field of the file is optional;
//! unknown fields are errors, and errors name the field and the file position.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Which model server's metric names `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFormat {
    #[default]
    Vllm,
    Sglang,
}

/// The engine model's constants. The defaults stand for an 8B-parameter model in 16-bit weights
/// on one 24 GB accelerator (L4/A10G class), the shape of the GKE Inference Gateway examples:
/// small enough that a few dozen concurrent long prompts fill the KV cache, so load shows.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineParams {
    /// The base model name served; requests must name it or one of `lora_adapters`.
    pub model: String,
    /// LoRA adapters this server can load; a request naming one runs with that adapter.
    pub lora_adapters: Vec<String>,
    /// Adapters that may be active in one batch at once (vLLM `--max-loras`, default 4 here).
    pub max_lora: u32,
    /// Time to load an adapter that is not resident into a slot, added to the step that loads it.
    pub lora_load_ms: f64,
    /// Tokens per KV-cache block (vLLM's default 16); the prefix cache hashes full blocks.
    pub block_size: u32,
    /// KV-cache blocks: 2,048 x 16 = 32,768 tokens, about 4 GiB at 128 KiB per token.
    pub num_blocks: u32,
    /// Most sequences in one batch (vLLM `--max-num-seqs`).
    pub max_num_seqs: u32,
    /// Token budget of one engine step: decodes take one each, prefill chunks take the rest
    /// (chunked prefill, vLLM's default 2,048 on this class of accelerator).
    pub max_num_batched_tokens: u32,
    /// Longest prompt plus output accepted; longer requests get 400, as from vLLM.
    pub max_model_len: u32,
    /// Fixed cost of one forward pass (weights streamed from memory once per step). This is the
    /// time per output token of a lone sequence.
    pub step_base_ms: f64,
    /// Prefill cost per uncached prompt token (about 6,700 tokens/s of prefill).
    pub prefill_ms_per_token: f64,
    /// Added step cost per decoding sequence: time per output token grows with batch size
    /// (25 ms alone, about 47 ms at 64 sequences).
    pub decode_ms_per_seq: f64,
    /// Output length when a request gives no `max_tokens` (it then finishes with `stop`).
    pub default_max_tokens: u32,
    /// Metric names served on `/metrics`.
    pub metrics_format: MetricsFormat,
}

impl Default for EngineParams {
    fn default() -> Self {
        EngineParams {
            model: fleetpick_protocol::engine::DEFAULT_MODEL.to_string(),
            lora_adapters: Vec::new(),
            max_lora: 4,
            lora_load_ms: 30.0,
            block_size: 16,
            num_blocks: 2048,
            max_num_seqs: 128,
            max_num_batched_tokens: 2048,
            max_model_len: 8192,
            step_base_ms: 25.0,
            prefill_ms_per_token: 0.15,
            decode_ms_per_seq: 0.35,
            default_max_tokens: 64,
            metrics_format: MetricsFormat::Vllm,
        }
    }
}

/// A partial [`EngineParams`], as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineOverrides {
    pub model: Option<String>,
    pub lora_adapters: Option<Vec<String>>,
    pub max_lora: Option<u32>,
    pub lora_load_ms: Option<f64>,
    pub block_size: Option<u32>,
    pub num_blocks: Option<u32>,
    pub max_num_seqs: Option<u32>,
    pub max_num_batched_tokens: Option<u32>,
    pub max_model_len: Option<u32>,
    pub step_base_ms: Option<f64>,
    pub prefill_ms_per_token: Option<f64>,
    pub decode_ms_per_seq: Option<f64>,
    pub default_max_tokens: Option<u32>,
    pub metrics_format: Option<MetricsFormat>,
}

impl EngineOverrides {
    fn apply(&self, p: &mut EngineParams) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { p.$f = v.clone(); } )* };
        }
        set!(
            model,
            lora_adapters,
            max_lora,
            lora_load_ms,
            block_size,
            num_blocks,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            step_base_ms,
            prefill_ms_per_token,
            decode_ms_per_seq,
            default_max_tokens,
            metrics_format
        );
    }
}

impl EngineParams {
    /// Checks the values a running engine relies on; `at` names where they came from.
    pub fn validate(&self, at: &str) -> Result<(), SimConfigError> {
        let bad =
            |field: &str, why: &str| Err(SimConfigError::Invalid(format!("{at}.{field}: {why}")));
        for (field, v) in [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("default_max_tokens", self.default_max_tokens),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        for (field, v) in [
            ("lora_load_ms", self.lora_load_ms),
            ("step_base_ms", self.step_base_ms),
            ("prefill_ms_per_token", self.prefill_ms_per_token),
            ("decode_ms_per_seq", self.decode_ms_per_seq),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, "must be a finite number of milliseconds, at least 0");
            }
        }
        if self.model.is_empty() {
            return bad("model", "must not be empty");
        }
        let capacity = u64::from(self.num_blocks) * u64::from(self.block_size);
        if u64::from(self.max_model_len) > capacity {
            // A request longer than the whole cache could never be scheduled: it would wait forever.
            return bad(
                "max_model_len",
                &format!(
                    "{} exceeds the KV cache (num_blocks x block_size = {capacity} tokens)",
                    self.max_model_len
                ),
            );
        }
        if !self.lora_adapters.is_empty() && self.max_lora == 0 {
            return bad(
                "max_lora",
                "must be at least 1 when lora_adapters are listed",
            );
        }
        if self.lora_adapters.iter().any(|a| a == &self.model) {
            return bad(
                "lora_adapters",
                "an adapter may not share the base model's name",
            );
        }
        Ok(())
    }
}

/// Per-cluster settings of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Network delay added to every request to this cluster's servers (a round trip across
    /// regions); changeable at run time through the admin API.
    #[serde(default)]
    pub network_delay_ms: f64,
    #[serde(default)]
    pub engine: EngineOverrides,
}

/// The simulator's config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default)]
    pub defaults: EngineOverrides,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterSettings>,
    #[serde(default)]
    pub servers: BTreeMap<String, EngineOverrides>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("cannot read simulator config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("simulator config {path}: {source}")]
    Parse {
        path: String,
        source: serde_norway::Error,
    },
    #[error("simulator config: {0}")]
    Invalid(String),
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<SimConfig, SimConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        SimConfig::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<SimConfig, SimConfigError> {
        if text.trim().is_empty() {
            return Ok(SimConfig::default());
        }
        serde_norway::from_str(text).map_err(|source| SimConfigError::Parse {
            path: path.to_string(),
            source,
        })
    }

    /// The engine parameters of server `name` in `cluster`, validated.
    pub fn params_for(&self, name: &str, cluster: &str) -> Result<EngineParams, SimConfigError> {
        let mut p = EngineParams::default();
        self.defaults.apply(&mut p);
        let mut at = "defaults".to_string();
        if let Some(c) = self.clusters.get(cluster) {
            c.engine.apply(&mut p);
            at = format!("clusters.{cluster}.engine");
        }
        if let Some(s) = self.servers.get(name) {
            s.apply(&mut p);
            at = format!("servers.{name}");
        }
        p.validate(&at)?;
        Ok(p)
    }

    /// Checks that every cluster and server the file names exists in the fleet, so that a typo
    /// does not silently leave a server on defaults.
    pub fn check_names<'a>(
        &self,
        clusters: &[String],
        servers: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), SimConfigError> {
        for (name, c) in &self.clusters {
            if !clusters.contains(name) {
                return Err(SimConfigError::Invalid(format!(
                    "clusters.{name}: no such cluster in the fleet (clusters: {})",
                    clusters.join(", ")
                )));
            }
            if !(c.network_delay_ms.is_finite() && c.network_delay_ms >= 0.0) {
                return Err(SimConfigError::Invalid(format!(
                    "clusters.{name}.network_delay_ms: must be a number of milliseconds, at least 0"
                )));
            }
        }
        for name in self.servers.keys() {
            if !servers.clone().any(|s| s == name) {
                return Err(SimConfigError::Invalid(format!(
                    "servers.{name}: no such server in the fleet"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_defaults_cluster_server() {
        let cfg = SimConfig::parse(
            "defaults: {num_blocks: 1000}\nclusters:\n  east:\n    engine: {num_blocks: 2000, max_num_seqs: 8}\nservers:\n  east-1: {max_num_seqs: 4}\n",
            "t.yaml",
        )
        .unwrap();
        let p = cfg.params_for("west-0", "west").unwrap();
        assert_eq!((p.num_blocks, p.max_num_seqs), (1000, 128));
        let p = cfg.params_for("east-0", "east").unwrap();
        assert_eq!((p.num_blocks, p.max_num_seqs), (2000, 8));
        let p = cfg.params_for("east-1", "east").unwrap();
        assert_eq!((p.num_blocks, p.max_num_seqs), (2000, 4));
    }

    #[test]
    fn unknown_field_is_named_with_position() {
        let err = SimConfig::parse("defaults:\n  num_blocs: 3\n", "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_blocs"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn the_removed_bytes_per_token_is_named_with_position() {
        // Prompts are tokenized now (see `tokenize`); an old file says so rather than being read
        // with the field silently ignored.
        let err = SimConfig::parse("servers:\n  a-0:\n    bytes_per_token: 4\n", "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `bytes_per_token`"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cfg = SimConfig::parse("servers:\n  a-0: {num_blocks: 0}\n", "t").unwrap();
        let err = cfg.params_for("a-0", "a").unwrap_err().to_string();
        assert!(err.contains("servers.a-0.num_blocks"), "{err}");
        let cfg = SimConfig::parse("defaults: {max_model_len: 100000}\n", "t").unwrap();
        let err = cfg.params_for("a-0", "a").unwrap_err().to_string();
        assert!(err.contains("defaults.max_model_len"), "{err}");
        let cfg = SimConfig::parse("servers:\n  nope: {}\n", "t").unwrap();
        let err = cfg
            .check_names(&["a".into()], ["a-0"].into_iter())
            .unwrap_err()
            .to_string();
        assert!(err.contains("servers.nope"), "{err}");
    }
}
