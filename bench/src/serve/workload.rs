//! What a load run sends: takes the length ranges (or a local JSONL of prompts) and a seed,
//! gives request `i`'s prompt text and `max_tokens`, the same on every run.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::LoadError;

/// A length: fixed (`16`) or drawn uniformly from an inclusive range (`8:32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LenRange {
    pub min: usize,
    pub max: usize,
}

impl LenRange {
    /// A fixed length.
    pub fn fixed(n: usize) -> Self {
        Self { min: n, max: n }
    }

    fn draw(self, rng: &mut StdRng) -> usize {
        rng.random_range(self.min..=self.max)
    }
}

impl FromStr for LenRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("`{t}` is not a length: {e}"));
        let r = match s.split_once(':') {
            Some((a, b)) => Self { min: num(a)?, max: num(b)? },
            None => Self::fixed(num(s)?),
        };
        if r.min == 0 || r.min > r.max {
            return Err(format!("`{s}`: a length range needs 1 <= MIN <= MAX"));
        }
        Ok(r)
    }
}

impl std::fmt::Display for LenRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}:{}", self.min, self.max)
        }
    }
}

/// One line of a prompts file: `{"prompt": "...", "max_tokens": 64}` (`max_tokens` optional).
#[derive(Debug, Clone, Deserialize)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    max_tokens: Option<usize>,
}

/// Where prompts come from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptSource {
    /// Synthetic text of this many words (each a few tokens for a byte-level tokenizer).
    Synthetic { words: LenRange },
    /// Prompts of a local JSONL file, used in order and cycled.
    File {
        path: PathBuf,
        #[serde(skip)]
        lines: Vec<(String, Option<usize>)>,
    },
}

impl PromptSource {
    /// Reads a JSONL prompts file; every line must parse.
    pub fn from_jsonl(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Prompts { path: path.into(), line: 0, reason: source.to_string() })?;
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let p: PromptLine = serde_json::from_str(l).map_err(|e| LoadError::Prompts { path: path.into(), line: i + 1, reason: e.to_string() })?;
            lines.push((p.prompt, p.max_tokens));
        }
        if lines.is_empty() {
            return Err(LoadError::Prompts { path: path.into(), line: 0, reason: "no prompts".into() });
        }
        Ok(Self::File { path: path.into(), lines })
    }
}

/// The requests of a run: prompts and output lengths.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub prompts: PromptSource,
    /// `max_tokens` of each request (a prompts file's own value wins).
    pub max_tokens: LenRange,
    pub seed: u64,
}

/// One request's body inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub prompt: String,
    pub max_tokens: usize,
}

/// Words synthetic prompts are made of.
const WORDS: [&str; 16] = [
    "river", "mangrove", "tide", "root", "salt", "heron", "mud", "current", "leaf", "delta", "shore", "crab", "reef", "storm", "estuary", "wind",
];

impl Workload {
    /// Request number `i` (deterministic in `seed` and `i`; distinct prompts so no two share a
    /// prefix beyond the first word).
    pub fn request(&self, i: usize) -> RequestSpec {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let drawn = self.max_tokens.draw(&mut rng);
        match &self.prompts {
            PromptSource::Synthetic { words } => {
                let n = words.draw(&mut rng);
                let mut prompt = format!("{i}");
                for _ in 1..n {
                    prompt.push(' ');
                    prompt.push_str(WORDS[rng.random_range(0..WORDS.len())]);
                }
                RequestSpec { prompt, max_tokens: drawn }
            }
            PromptSource::File { lines, .. } => {
                let (prompt, own) = &lines[i % lines.len()];
                RequestSpec { prompt: prompt.clone(), max_tokens: own.unwrap_or(drawn) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_ranges_parse_and_reject() {
        assert_eq!("16".parse::<LenRange>().unwrap(), LenRange::fixed(16));
        assert_eq!("8:32".parse::<LenRange>().unwrap(), LenRange { min: 8, max: 32 });
        assert!("0".parse::<LenRange>().is_err());
        assert!("9:3".parse::<LenRange>().is_err());
        assert!("x".parse::<LenRange>().unwrap_err().contains("`x`"));
    }

    #[test]
    fn synthetic_requests_are_deterministic_and_in_range() {
        let w = Workload { prompts: PromptSource::Synthetic { words: LenRange { min: 3, max: 6 } }, max_tokens: LenRange { min: 2, max: 4 }, seed: 7 };
        for i in 0..50 {
            let r = w.request(i);
            assert_eq!(r, w.request(i));
            let words = r.prompt.split(' ').count();
            assert!((3..=6).contains(&words), "{words}");
            assert!((2..=4).contains(&r.max_tokens));
            assert!(r.prompt.starts_with(&format!("{i} ")));
        }
    }

    #[test]
    fn jsonl_prompts_cycle_and_keep_their_max_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\", \"max_tokens\": 3}\n").unwrap();
        let w = Workload { prompts: PromptSource::from_jsonl(&p).unwrap(), max_tokens: LenRange::fixed(9), seed: 0 };
        assert_eq!(w.request(0), RequestSpec { prompt: "a".into(), max_tokens: 9 });
        assert_eq!(w.request(1), RequestSpec { prompt: "b".into(), max_tokens: 3 });
        assert_eq!(w.request(2).prompt, "a");
        std::fs::write(&p, "{\"prompt\": \"a\"}\nnot json\n").unwrap();
        let e = PromptSource::from_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
