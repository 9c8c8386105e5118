//! Text ↔ token ids through the checkpoint's `tokenizer.json` (Hugging Face `tokenizers`),
//! plus the simple chat template the server applies to `messages`.

use std::path::{Path, PathBuf};

/// Errors of loading or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Run(String),
}

/// End-of-sequence token names tried when `config.json` has no `eos_token_id`.
const EOS_NAMES: [&str; 4] = ["<|end_of_text|>", "<|eot_id|>", "</s>", "<|endoftext|>"];

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.vocab_size()).finish()
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The chat template: `"{role}: {content}\n"` per message, then `"assistant:"`.
pub fn chat_prompt(messages: &[ChatMessage]) -> String {
    let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
    s.push_str("assistant:");
    s
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load { path, message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Wraps an already built tokenizer.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Token ids of `text` (with the tokenizer's own special tokens, e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, true).map_err(|e| TokenizerError::Run(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Run(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The first end-of-sequence token the vocabulary knows.
    pub fn eos_id(&self) -> Option<u32> {
        EOS_NAMES.iter().find_map(|n| self.inner.token_to_id(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template() {
        let m = [ChatMessage { role: "user".into(), content: "hi".into() }];
        assert_eq!(chat_prompt(&m), "user: hi\nassistant:");
    }
}
