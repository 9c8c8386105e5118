//! A checkpoint's `generation_config.json`: the sampling defaults a request that omits them
//! gets (the keys vLLM reads: temperature, top_p, top_k, min_p, repetition_penalty,
//! max_new_tokens) and extra end tokens (`eos_token_id`). Absent file: no defaults.

use std::path::{Path, PathBuf};

use mangrove_core::model_config::TokenIds;
use serde::Deserialize;

/// Errors of reading `generation_config.json`.
#[derive(Debug, thiserror::Error)]
pub enum GenerationConfigError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid generation config")]
    Json { path: PathBuf, source: serde_json::Error },
}

/// The defaults of `generation_config.json` (every key optional; others ignored, as
/// transformers keeps many that do not concern serving).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// The default `max_tokens`.
    #[serde(default)]
    pub max_new_tokens: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; no file, no defaults.
    pub fn load(dir: &Path) -> Result<Self, GenerationConfigError> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| GenerationConfigError::Json { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(GenerationConfigError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_keys_it_knows_and_ignores_the_rest() {
        let dir = tempfile_dir();
        assert_eq!(GenerationDefaults::load(&dir).unwrap(), GenerationDefaults::default());
        std::fs::write(dir.join("generation_config.json"), r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2], "transformers_version": "4"}"#).unwrap();
        let g = GenerationDefaults::load(&dir).unwrap();
        assert_eq!((g.temperature, g.top_p, g.eos_token_id.map(|e| e.ids())), (Some(0.6), Some(0.9), Some(vec![1, 2])));
        std::fs::write(dir.join("generation_config.json"), r#"{"temperature": "hot"}"#).unwrap();
        assert!(GenerationDefaults::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("mangrove-genconf-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
