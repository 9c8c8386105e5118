//! Random-weight checkpoints in the exact on-disk format the engine loads (see
//! `engine/README.md`): `config.json`, `model.safetensors`, `tokenizer.json`. Takes a
//! [`Preset`] and a seed; gives a directory. Same seed, same bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

pub use mangrove_core::model_config::{Preset, TINY_VOCAB};

/// Errors of writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot serialize {what}: {message}")]
    Serialize { what: &'static str, message: String },
}

const MERGES: [&str; 41] = [
    "Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "e n", "Ġ w", "o r", "Ġ o", "i s",
    "Ġ c", "a n", "e s", "Ġ b", "i t", "Ġ f", "Ġ p", "a r", "Ġ m", "a l", "Ġ d", "o u", "Ġ h", "l e", "Ġ i", "e d",
    "Ġ in", "n g", "i ng", "Ġ l", "Ġ n", "Ġ e", "o m", "Ġ g", "l l", "s t",
];
const SPECIALS: [&str; 3] = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"];

struct Gen {
    rng: StdRng,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

impl Gen {
    fn bf16(&mut self, name: String, shape: Vec<usize>, f: impl Fn(&mut StdRng) -> f32) {
        let n: usize = shape.iter().product();
        let data = (0..n).flat_map(|_| half::bf16::from_f32(f(&mut self.rng)).to_le_bytes()).collect();
        self.tensors.insert(name, (Dtype::BF16, shape, data));
    }

    fn uniform(&mut self, name: String, shape: Vec<usize>, center: f32, half_width: f32) {
        self.bf16(name, shape, |r| center + r.random_range(-half_width..=half_width));
    }

    /// Packed ternary `prefix.weight` [n/4, k] (about a third zeros) and `prefix.weight_scale`.
    fn ternary(&mut self, prefix: &str, n: usize, k: usize) {
        // One random byte per packed byte: 243 = 3^5 values map evenly onto the 81 = 3^4
        // codes of four ternary weights; the 13 values above are rejected.
        let lut: Vec<u8> = (0..81u32).map(|v| (0..4).fold(0u8, |b, q| b | (((v / 3u32.pow(q)) % 3) as u8) << (2 * q))).collect();
        let len = n / 4 * k;
        let mut data = Vec::with_capacity(len);
        let mut buf = vec![0u8; 1 << 16];
        while data.len() < len {
            self.rng.fill_bytes(&mut buf);
            let need = len - data.len();
            data.extend(buf.iter().filter(|&&r| r < 243).map(|&r| lut[(r % 81) as usize]).take(need));
        }
        self.tensors.insert(format!("{prefix}.weight"), (Dtype::U8, vec![n / 4, k], data));
        let scale = (k as f32).powf(-0.5) * self.rng.random_range(0.8f32..1.2);
        self.bf16(format!("{prefix}.weight_scale"), vec![1], |_| scale);
    }
}

/// Writes a random checkpoint of `preset` into `out` (created if needed).
pub fn generate(preset: Preset, out: &Path, seed: u64) -> Result<(), GenError> {
    generate_with(preset, out, seed, None)
}

/// [`generate`] with the preset's layer count replaced by `layers` (e.g. bitnet-2b widths with
/// 2 layers: the real kernel shapes at a fraction of the size).
pub fn generate_with(preset: Preset, out: &Path, seed: u64, layers: Option<usize>) -> Result<(), GenError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GenError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut cfg = preset.config();
    if let Some(l) = layers {
        cfg.num_hidden_layers = l.max(1);
    }
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_dim.unwrap_or(h / cfg.num_attention_heads);
    let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads) * hd);
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), tensors: BTreeMap::new() };
    g.uniform("model.embed_tokens.weight".into(), vec![v, h], 0.0, 0.1);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        g.uniform(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.1);
        for (name, n, k) in [("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd)] {
            g.ternary(&format!("{p}.self_attn.{name}"), n, k);
        }
        g.uniform(format!("{p}.self_attn.attn_sub_norm.weight"), vec![h], 1.0, 0.1);
        g.uniform(format!("{p}.post_attention_layernorm.weight"), vec![h], 1.0, 0.1);
        match (cfg.num_experts, cfg.moe_intermediate_size) {
            (Some(e), Some(mi)) => {
                g.uniform(format!("{p}.mlp.gate.weight"), vec![e, h], 0.0, 0.5);
                for x in 0..e {
                    let q = format!("{p}.mlp.experts.{x}");
                    g.ternary(&format!("{q}.gate_proj"), mi, h);
                    g.ternary(&format!("{q}.up_proj"), mi, h);
                    g.ternary(&format!("{q}.down_proj"), h, mi);
                }
            }
            _ => {
                g.ternary(&format!("{p}.mlp.gate_proj"), i, h);
                g.ternary(&format!("{p}.mlp.up_proj"), i, h);
                g.ternary(&format!("{p}.mlp.down_proj"), h, i);
                g.uniform(format!("{p}.mlp.ffn_sub_norm.weight"), vec![i], 1.0, 0.1);
            }
        }
    }
    g.uniform("model.norm.weight".into(), vec![h], 1.0, 0.1);
    if !cfg.tie_word_embeddings {
        g.uniform("lm_head.weight".into(), vec![v, h], 0.0, 0.1);
    }
    let views: Vec<(String, TensorView)> = g
        .tensors
        .iter()
        .map(|(n, (d, s, b))| TensorView::new(*d, s.clone(), b).map(|t| (n.clone(), t)))
        .collect::<Result<_, _>>()
        .map_err(|e| GenError::Serialize { what: "model.safetensors", message: e.to_string() })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let wpath = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &wpath)
        .map_err(|e| GenError::Serialize { what: "model.safetensors", message: e.to_string() })?;
    let json = |what, v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| GenError::Serialize { what, message: e.to_string() })
    };
    let cpath = out.join("config.json");
    let cjson = serde_json::to_value(&cfg).map_err(|e| GenError::Serialize { what: "config.json", message: e.to_string() })?;
    std::fs::write(&cpath, json("config.json", &cjson)?).map_err(io(&cpath))?;
    let tpath = out.join("tokenizer.json");
    std::fs::write(&tpath, json("tokenizer.json", &tokenizer_json(v))?).map_err(io(&tpath))?;
    Ok(())
}

/// GPT-2's byte → printable char map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A byte-level BPE `tokenizer.json`: every byte is a token, so any text tokenizes. Ids
/// 0..256 are bytes, then [`MERGES`], then the specials; ids up to `vocab` are padded with
/// extra specials so every id the model can emit decodes.
pub fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let mut merges = Vec::new();
    for m in MERGES {
        let (a, b) = m.split_once(' ').unwrap_or((m, ""));
        debug_assert!(tokens.iter().any(|t| t == a) && tokens.iter().any(|t| t == b), "merge {m}");
        tokens.push(format!("{a}{b}"));
        merges.push(m.to_string());
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i.into())).collect();
    let mut specials: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    // The real 2B vocab has 128256 ids: pad so ids [300, vocab) are reserved specials.
    let first_special = tokens.len();
    while first_special + specials.len() < vocab {
        specials.push(format!("<|reserved_{}|>", specials.len()));
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": first_special + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_codes_are_valid_and_balanced() {
        let mut g = Gen { rng: StdRng::seed_from_u64(1), tensors: BTreeMap::new() };
        g.ternary("w", 64, 256);
        let (_, shape, data) = &g.tensors["w.weight"];
        assert_eq!(shape, &vec![16, 256]);
        let w = mangrove_core::reference::unpack_ternary(data, 64, 256);
        assert!(data.iter().all(|b| (0..4).all(|q| (b >> (2 * q)) & 3 != 3)));
        for v in -1..=1 {
            let frac = w.iter().filter(|&&x| x == v).count() as f64 / w.len() as f64;
            assert!((frac - 1.0 / 3.0).abs() < 0.03, "{v}: {frac}");
        }
        assert!(g.tensors.contains_key("w.weight_scale"));
    }

    #[test]
    fn tokenizer_json_has_the_vocab_size() {
        let t = tokenizer_json(TINY_VOCAB);
        let n = t["model"]["vocab"].as_object().unwrap().len() + t["added_tokens"].as_array().unwrap().len();
        assert_eq!(n, TINY_VOCAB);
        assert_eq!(t["added_tokens"][1]["content"], "<|end_of_text|>");
        assert_eq!(t["added_tokens"][1]["id"], 298);
    }
}
