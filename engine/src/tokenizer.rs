//! Text ↔ token ids through the checkpoint's `tokenizer.json` (Hugging Face `tokenizers`),
//! incremental detokenization ([`TextStream`]) and each token's own text (for logprobs).

use std::path::{Path, PathBuf};

use crate::chat_template::Fallback;

/// Errors of loading or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Run(String),
}

/// End-of-text and end-of-turn token names; any the vocabulary has ends a sequence.
const EOS_NAMES: [&str; 4] = ["<|end_of_text|>", "<|eot_id|>", "</s>", "<|endoftext|>"];

/// Incremental detokenization of one generated sequence: each token's text comes from a short
/// window of ids (the `tokenizers` crate's decode-stream algorithm: decode the window, emit what
/// follows the text of its already-emitted prefix), so a token costs O(window) instead of a
/// decode of the whole sequence. Nothing is appended while the text ends inside a UTF-8
/// character.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    /// Every id stepped so far (to resynchronize by a full decode).
    all: Vec<u32>,
    /// The window, the text of its emitted prefix and that prefix's length in ids.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// The sequence's text so far.
    pub text: String,
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.vocab_size()).finish()
    }
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
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with the tokenizer's special tokens only if `add_special_tokens`
    /// (a chat template writes its own).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Run(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of one token, special tokens included (a byte of a longer character shows as U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Run(e.to_string()))
    }

    /// Appends the text `id` adds (special tokens skipped) to `stream.text`. Where the window
    /// cannot be decoded on its own (a decoder whose output for a window does not extend its
    /// prefix's), the text is rebuilt by one decode of the whole sequence and the window restarts.
    pub fn step(&self, stream: &mut TextStream, id: u32) -> Result<(), TokenizerError> {
        stream.all.push(id);
        let TextStream { ids, prefix, prefix_index, text, all } = stream;
        match tokenizers::step_decode_stream(&self.inner, vec![id], true, ids, prefix, prefix_index) {
            Ok(Some(chunk)) => text.push_str(&chunk),
            Ok(None) => {}
            Err(_) => {
                let full = self.decode(all)?;
                *text = full.trim_end_matches('\u{FFFD}').to_string();
                *ids = all.clone();
                *prefix = text.clone();
                *prefix_index = all.len();
            }
        }
        Ok(())
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-text / end-of-turn tokens the vocabulary knows.
    pub fn end_ids(&self) -> Vec<u32> {
        EOS_NAMES.iter().filter_map(|n| self.inner.token_to_id(n)).collect()
    }

    /// The built-in chat format for a checkpoint without a template:
    /// [`Fallback::BitNet`] when the vocabulary has `<|eot_id|>` (bitnet-b1.58-2B-4T), else
    /// [`Fallback::Simple`].
    pub fn fallback_chat(&self) -> Fallback {
        if self.inner.token_to_id("<|eot_id|>").is_some() {
            Fallback::BitNet
        } else {
            Fallback::Simple
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_level() -> Tokenizer {
        let json = crate::genmodel::tokenizer_json(300).to_string();
        Tokenizer::from_inner(json.parse().unwrap())
    }

    #[test]
    fn stream_text_is_the_whole_decode_at_every_step() {
        let t = byte_level();
        // Multi-byte characters split across byte tokens, merges, spaces and a special token.
        let text = "héllo wörld, ünïcode ✓ 日本語 the end";
        let mut ids = t.encode(text).unwrap();
        ids.insert(5, t.end_ids()[0]);
        let mut stream = TextStream::default();
        for n in 1..=ids.len() {
            t.step(&mut stream, ids[n - 1]).unwrap();
            let full = t.decode(&ids[..n]).unwrap();
            assert_eq!(stream.text, full.trim_end_matches('\u{FFFD}'), "after {n} tokens");
        }
        assert_eq!(stream.text, text);
    }
}
