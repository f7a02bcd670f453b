//! The model-server engines fleetpick knows, each by the metric names it serves on `/metrics`.

use std::fmt;

/// The model the simulated engines serve, and the load generator asks for, unless told
/// otherwise: an 8B model, as on one 24 GB accelerator.
pub const DEFAULT_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A model-server engine: which metric names its `/metrics` page uses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Vllm,
    Sglang,
    Trtllm,
    Triton,
}

impl EngineKind {
    /// The lowercase name, as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Trtllm => "trtllm",
            EngineKind::Triton => "triton",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_kind_serde_names() {
        for kind in [
            EngineKind::Vllm,
            EngineKind::Sglang,
            EngineKind::Trtllm,
            EngineKind::Triton,
        ] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<EngineKind>(&json).unwrap(), kind);
        }
        assert_eq!(EngineKind::default(), EngineKind::Vllm);
    }
}
