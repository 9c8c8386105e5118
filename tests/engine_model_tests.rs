//! The CPU backend against an independent, straightforward f64 implementation written here
//! (plain loops; it shares nothing with the engine but the checkpoint bytes), KV-cache and
//! batching consistency, seeded determinism, and clear errors for malformed checkpoints.

// The reference below is written as plain index loops on purpose: it must read like the math.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use mangrove::engine::batcher::{self, GenEvent, GenRequest};
use mangrove::engine::backend::{KvCache, SeqInput};
use mangrove::engine::cpu;
use mangrove::engine::genmodel::{generate, Preset};
use mangrove::engine::metrics::Metrics;
use mangrove::engine::model::{LoadError, Model};
use mangrove::engine::sampling::SamplingParams;
use mangrove::engine::{Engine, EngineError};

// ---------- the independent reference ----------

struct Ckpt {
    cfg: serde_json::Value,
    t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

fn read_ckpt(dir: &Path) -> Ckpt {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t = HashMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let vals: Vec<f64> = match v.dtype() {
            safetensors::Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
            safetensors::Dtype::BF16 => {
                // bf16 is the top half of an f32.
                d.chunks(2).map(|b| f32::from_bits(((b[1] as u32) << 24) | ((b[0] as u32) << 16)) as f64).collect()
            }
            other => panic!("unexpected dtype {other:?}"),
        };
        t.insert(name, (v.shape().to_vec(), vals));
    }
    Ckpt { cfg, t }
}

impl Ckpt {
    fn u(&self, k: &str) -> usize {
        self.cfg[k].as_u64().unwrap() as usize
    }
    fn get(&self, name: &str) -> &Vec<f64> {
        &self.t[name].1
    }

    /// Ternary matrix [n][k] from the packed bytes: byte (j, c) bits 2q..2q+1 hold row j + q*n/4, as w+1.
    fn ternary(&self, prefix: &str) -> (Vec<Vec<f64>>, f64) {
        let (shape, bytes) = &self.t[&format!("{prefix}.weight")];
        let (n4, k) = (shape[0], shape[1]);
        let mut w = vec![vec![0.0; k]; n4 * 4];
        for j in 0..n4 {
            for c in 0..k {
                let b = bytes[j * k + c] as u8;
                for q in 0..4 {
                    w[j + q * n4][c] = ((b >> (2 * q)) & 3) as f64 - 1.0;
                }
            }
        }
        (w, self.get(&format!("{prefix}.weight_scale"))[0])
    }

    /// AutoBitLinear offline: int8 per-token activations, y = (x_q W^T) / s * weight_scale.
    fn linear(&self, prefix: &str, x: &[f64]) -> Vec<f64> {
        let (w, ws) = self.ternary(prefix);
        let mut maxabs: f64 = 0.0;
        for v in x {
            maxabs = maxabs.max(v.abs());
        }
        if maxabs < 1e-5 {
            maxabs = 1e-5;
        }
        let s = 127.0 / maxabs;
        let mut xq = vec![0.0; x.len()];
        for i in 0..x.len() {
            xq[i] = (x[i] * s).round_ties_even().clamp(-128.0, 127.0);
        }
        let mut y = vec![0.0; w.len()];
        for r in 0..w.len() {
            let mut acc = 0.0;
            for c in 0..x.len() {
                acc += w[r][c] * xq[c];
            }
            // AutoBitLinear multiplies by weight_scale; BitLinear divides by it.
            y[r] = if self.cfg["quantization_config"]["linear_class"] == "bitlinear" { acc / (s * ws) } else { acc / s * ws };
        }
        y
    }

    fn norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let g = self.get(name);
        let eps = self.cfg["rms_norm_eps"].as_f64().unwrap();
        let mut ss = 0.0;
        for v in x {
            ss += v * v;
        }
        let r = 1.0 / (ss / x.len() as f64 + eps).sqrt();
        (0..x.len()).map(|i| x[i] * r * g[i]).collect()
    }

    fn rope(&self, v: &mut [f64], pos: usize) {
        let theta = self.cfg["rope_theta"].as_f64().unwrap();
        let d = v.len();
        let old = v.to_vec();
        for i in 0..d / 2 {
            let f = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
            v[i] = old[i] * f.cos() - old[i + d / 2] * f.sin();
            v[i + d / 2] = old[i + d / 2] * f.cos() + old[i] * f.sin();
        }
    }

    /// Logits of every position of `tokens`, recomputing the whole sequence (no cache).
    fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (h, heads, kvh) = (self.u("hidden_size"), self.u("num_attention_heads"), self.u("num_key_value_heads"));
        let hd = h / heads;
        let emb = self.get("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        for l in 0..self.u("num_hidden_layers") {
            let p = format!("model.layers.{l}");
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let xn = self.norm(&format!("{p}.input_layernorm.weight"), x);
                let mut q = self.linear(&format!("{p}.self_attn.q_proj"), &xn);
                let mut k = self.linear(&format!("{p}.self_attn.k_proj"), &xn);
                for hh in 0..heads {
                    self.rope(&mut q[hh * hd..(hh + 1) * hd], pos);
                }
                for hh in 0..kvh {
                    self.rope(&mut k[hh * hd..(hh + 1) * hd], pos);
                }
                qs.push(q);
                ks.push(k);
                vs.push(self.linear(&format!("{p}.self_attn.v_proj"), &xn));
            }
            for pos in 0..xs.len() {
                let mut att = vec![0.0; heads * hd];
                for hh in 0..heads {
                    let g = hh / (heads / kvh);
                    let mut sc = Vec::new();
                    for j in 0..=pos {
                        let mut d = 0.0;
                        for i in 0..hd {
                            d += qs[pos][hh * hd + i] * ks[j][g * hd + i];
                        }
                        sc.push(d / (hd as f64).sqrt());
                    }
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                    for j in 0..=pos {
                        for i in 0..hd {
                            att[hh * hd + i] += (sc[j] - m).exp() / z * vs[j][g * hd + i];
                        }
                    }
                }
                let a = self.norm(&format!("{p}.self_attn.attn_sub_norm.weight"), &att);
                let o = self.linear(&format!("{p}.self_attn.o_proj"), &a);
                for i in 0..h {
                    xs[pos][i] += o[i];
                }
                let y = self.norm(&format!("{p}.post_attention_layernorm.weight"), &xs[pos]);
                let f = if self.cfg.get("num_experts").is_some_and(|v| !v.is_null()) { self.moe(&p, &y) } else { self.mlp(&p, &y) };
                for i in 0..h {
                    xs[pos][i] += f[i];
                }
            }
        }
        let head = self.get("model.embed_tokens.weight"); // tied
        let v = self.u("vocab_size");
        xs.iter()
            .map(|x| {
                let xn = self.norm("model.norm.weight", x);
                (0..v).map(|t| (0..h).map(|i| head[t * h + i] * xn[i]).sum()).collect()
            })
            .collect()
    }

    fn mlp(&self, p: &str, y: &[f64]) -> Vec<f64> {
        let g = self.linear(&format!("{p}.mlp.gate_proj"), y);
        let u = self.linear(&format!("{p}.mlp.up_proj"), y);
        let m: Vec<f64> = (0..g.len()).map(|i| g[i].max(0.0).powi(2) * u[i]).collect();
        let m = self.norm(&format!("{p}.mlp.ffn_sub_norm.weight"), &m);
        self.linear(&format!("{p}.mlp.down_proj"), &m)
    }

    fn moe(&self, p: &str, y: &[f64]) -> Vec<f64> {
        let (e, topk, h) = (self.u("num_experts"), self.u("num_experts_per_tok"), y.len());
        let r = self.get(&format!("{p}.mlp.gate.weight"));
        let logits: Vec<f64> = (0..e).map(|x| (0..h).map(|i| r[x * h + i] * y[i]).sum()).collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let probs: Vec<f64> = logits.iter().map(|l| (l - m).exp() / z).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap());
        let chosen = &order[..topk];
        let sum: f64 = chosen.iter().map(|&x| probs[x]).sum();
        let mut out = vec![0.0; h];
        for &x in chosen {
            let q = format!("{p}.mlp.experts.{x}");
            let g = self.linear(&format!("{q}.gate_proj"), y);
            let u = self.linear(&format!("{q}.up_proj"), y);
            let a: Vec<f64> = (0..g.len()).map(|i| g[i] / (1.0 + (-g[i]).exp()) * u[i]).collect();
            let d = self.linear(&format!("{q}.down_proj"), &a);
            for i in 0..h {
                out[i] += probs[x] / sum * d[i];
            }
        }
        out
    }
}

// ---------- helpers ----------

fn gen(preset: Preset, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate(preset, dir.path(), seed).unwrap();
    dir
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * scale, "{what}: logit {i}: {g} vs {w} (scale {scale})");
    }
}

fn argmax(v: &[f64]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

fn check_against_reference(preset: Preset, linear_class: &str) {
    let dir = gen(preset, 11);
    let cpath = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    cfg["quantization_config"]["linear_class"] = linear_class.into();
    std::fs::write(&cpath, cfg.to_string()).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let ck = read_ckpt(dir.path());
    let prompt = [5u32, 72, 101, 108, 108, 111, 298, 33];
    // Prefill, then four greedy decode steps through the KV cache.
    let mut cache = KvCache::new(&model.config);
    let mut toks = prompt.to_vec();
    let mut feed = prompt.to_vec();
    for step in 0..5 {
        let got = cpu::forward(&model, &mut [SeqInput { tokens: &feed, cache: &mut cache }]).unwrap();
        let want = ck.logits(&toks);
        assert_close(&got[0], want.last().unwrap(), &format!("{preset:?} step {step}"));
        let next = argmax(&got[0]);
        assert_eq!(next, argmax(want.last().unwrap()), "{preset:?} step {step}: greedy token");
        toks.push(next);
        feed = vec![next];
    }
    assert_eq!(cache.len(), prompt.len() + 4);
}

// ---------- tests ----------

#[test]
fn tiny_logits_match_independent_f64_reference() {
    check_against_reference(Preset::Tiny, "autobitlinear");
}

#[test]
fn tiny_bitlinear_class_divides_by_weight_scale_like_the_reference() {
    check_against_reference(Preset::Tiny, "bitlinear");
}

#[test]
fn tiny_moe_logits_match_independent_f64_reference() {
    check_against_reference(Preset::TinyMoe, "autobitlinear");
}

#[test]
fn batched_forward_equals_one_by_one() {
    let dir = gen(Preset::Tiny, 3);
    let model = Model::load(dir.path()).unwrap();
    let (a, b) = ([1u32, 2, 3, 4, 5], [200u32, 7]);
    let solo = |t: &[u32]| cpu::forward(&model, &mut [SeqInput { tokens: t, cache: &mut KvCache::new(&model.config) }]).unwrap();
    let (ca, cb) = (&mut KvCache::new(&model.config), &mut KvCache::new(&model.config));
    let both = cpu::forward(&model, &mut [SeqInput { tokens: &a, cache: ca }, SeqInput { tokens: &b, cache: cb }]).unwrap();
    assert_eq!(both[0], solo(&a)[0]);
    assert_eq!(both[1], solo(&b)[0]);
}

#[test]
fn forward_errors_are_clear() {
    let dir = gen(Preset::Tiny, 3);
    let model = Model::load(dir.path()).unwrap();
    let mut c = KvCache::new(&model.config);
    let e = cpu::forward(&model, &mut [SeqInput { tokens: &[5000], cache: &mut c }]).unwrap_err();
    assert!(e.to_string().contains("token id 5000"), "{e}");
    assert!(c.is_empty());
}

#[test]
fn gen_model_is_deterministic_per_seed() {
    let (a, b, c) = (gen(Preset::Tiny, 9), gen(Preset::Tiny, 9), gen(Preset::Tiny, 10));
    let read = |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
}

#[test]
fn tokenizer_covers_any_text() {
    let dir = gen(Preset::Tiny, 1);
    let e = Engine::open(dir.path(), "cpu", None).unwrap();
    for text in ["the cat sat", "ünïcødé ✓ 日本", "\n\t{}\"\\", ""] {
        let ids = e.tokenizer.encode(text).unwrap();
        assert!(ids.iter().all(|&t| (t as usize) < e.config().vocab));
        assert_eq!(e.tokenizer.decode(&ids).unwrap(), text);
    }
    assert_eq!(e.eos, vec![298]);
}

async fn generate_text(engine: Arc<Engine>, prompt: &str, sampling: SamplingParams, max_tokens: usize) -> (String, usize) {
    let (handle, _task) = batcher::spawn(engine.clone(), Arc::new(Metrics::default()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt = engine.tokenizer.encode(prompt).unwrap();
    handle.submit(GenRequest { prompt, max_tokens, sampling, stop: vec![], events: tx, options: Default::default() }).unwrap();
    let mut text = String::new();
    loop {
        match rx.recv().await.unwrap() {
            GenEvent::Delta(d) => text.push_str(&d),
            GenEvent::Done(f) => return (text, f.completion_tokens),
            GenEvent::Prompt(_) | GenEvent::Tokens(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_and_tiny_moe_generate_deterministically_under_a_seed() {
    for preset in [Preset::Tiny, Preset::TinyMoe] {
        let dir = gen(preset, 5);
        let engine = Arc::new(Engine::open(dir.path(), "cpu", None).unwrap());
        let s = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(1234), ..SamplingParams::default() };
        let first = generate_text(engine.clone(), "Once upon a time", s, 12).await;
        let second = generate_text(engine.clone(), "Once upon a time", s, 12).await;
        assert_eq!(first, second, "{preset:?}");
        assert_eq!(first.1, 12);
        let g = SamplingParams { temperature: 0.0, top_p: 1.0, seed: None, ..SamplingParams::default() };
        assert_eq!(generate_text(engine.clone(), "abc", g, 6).await, generate_text(engine, "abc", g, 6).await);
    }
}

// ---------- malformed checkpoints ----------

fn open_err(dir: &Path) -> String {
    let e = Engine::open(dir, "cpu", None).unwrap_err();
    e.to_string()
}

/// Rewrites model.safetensors with `edit` applied to the tensor map.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut ts);
    let views: Vec<_> = ts.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn malformed_checkpoints_name_the_problem() {
    let q = "model.layers.1.self_attn.q_proj.weight";
    let dir = gen(Preset::Tiny, 2);
    edit_tensors(dir.path(), |ts| ts.retain(|t| t.0 != q));
    let e = open_err(dir.path());
    assert!(e.contains(q) && e.contains("missing"), "{e}");

    let dir = gen(Preset::Tiny, 2);
    edit_tensors(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == q).unwrap();
        t.2 = vec![t.2[1], t.2[0]];
    });
    let e = open_err(dir.path());
    assert!(e.contains(q) && e.contains("shape"), "{e}");

    let dir = gen(Preset::Tiny, 2);
    let norm = "model.norm.weight";
    edit_tensors(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == norm).unwrap();
        t.1 = safetensors::Dtype::I16;
    });
    let e = open_err(dir.path());
    assert!(e.contains(norm) && e.contains("dtype"), "{e}");

    let dir = gen(Preset::Tiny, 2);
    edit_tensors(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == q).unwrap();
        t.3[0] = 0xff;
    });
    assert!(open_err(dir.path()).contains(q));

    let scale = "model.layers.0.mlp.down_proj.weight_scale";
    let dir = gen(Preset::Tiny, 2);
    edit_tensors(dir.path(), |ts| ts.retain(|t| t.0 != scale));
    assert!(open_err(dir.path()).contains(scale));

    // A NaN norm weight (bf16 0x7fc0) is refused by name.
    let dir = gen(Preset::Tiny, 2);
    edit_tensors(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == norm).unwrap();
        t.3[2..4].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    });
    let e = open_err(dir.path());
    assert!(e.contains(norm) && e.contains("finite"), "{e}");

    // Values beyond any real checkpoint in config.json are refused before anything is allocated.
    for (key, value) in [("num_hidden_layers", "1000000000"), ("rms_norm_eps", "-1"), ("rope_theta", "0")] {
        let dir = gen(Preset::Tiny, 2);
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        c[key] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let e = open_err(dir.path());
        assert!(e.contains(key), "{key}={value}: {e}");
    }

    let dir = gen(Preset::Tiny, 2);
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

    let dir = gen(Preset::Tiny, 2);
    std::fs::write(dir.path().join("model.safetensors"), b"not a safetensors file").unwrap();
    assert!(open_err(dir.path()).contains("model.safetensors"));

    let dir = gen(Preset::Tiny, 2);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(open_err(dir.path()).contains("tokenizer.json"));

    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(Engine::open(dir.path(), "cpu", None), Err(EngineError::Load(LoadError::Io { .. }))));
    let dir = gen(Preset::Tiny, 2);
    assert!(open_err_backend(dir.path()).contains("cuda"));
}

fn open_err_backend(dir: &Path) -> String {
    Engine::open(dir, "cuda", None).unwrap_err().to_string()
}

#[tokio::test(flavor = "current_thread")]
async fn requests_submitted_together_share_decode_steps() {
    let dir = gen(Preset::Tiny, 4);
    let engine = Arc::new(Engine::open(dir.path(), "cpu", None).unwrap());
    let metrics = Arc::new(Metrics::default());
    let (handle, _task) = batcher::spawn(engine.clone(), metrics.clone());
    // The engine task cannot run before we await, so all three join the first step.
    let mut rxs = Vec::new();
    for (i, p) in ["a", "bb bb", "the cat"].iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt = engine.tokenizer.encode(p).unwrap();
        let sampling = SamplingParams { temperature: 0.7, top_p: 1.0, seed: Some(i as u64), ..SamplingParams::default() };
        handle.submit(GenRequest { prompt, max_tokens: 4, sampling, stop: vec![], events: tx, options: Default::default() }).unwrap();
        rxs.push(rx);
    }
    for mut rx in rxs {
        while let Some(e) = rx.recv().await {
            if let GenEvent::Done(f) = e {
                assert_eq!((f.completion_tokens, f.error), (4, None));
                break;
            }
        }
    }
    let j = metrics.json();
    assert_eq!(j["tokens_generated"], 12);
    let attention = j["paths"].as_array().unwrap().iter().find(|p| p["family"] == "attention").unwrap();
    assert_eq!(attention["count"], 4, "three sequences, four batched steps: {j}");
}

#[test]
fn llama3_style_tokenizer_with_lookahead_regex_and_bos_loads() {
    // bitnet-b1.58-2B-4T ships a Llama 3 tokenizer: a Split pre-tokenizer whose regex needs
    // lookahead (fancy-regex) and a TemplateProcessing post-processor that adds BOS.
    let dir = gen(Preset::Tiny, 1);
    let mut t = mangrove::engine::genmodel::tokenizer_json(300);
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    t["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    t["post_processor"] = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [297], "tokens": ["<|begin_of_text|>"]}}});
    std::fs::write(dir.path().join("tokenizer.json"), t.to_string()).unwrap();
    let e = Engine::open(dir.path(), "cpu", None).unwrap();
    let text = "Hello   world's 12345 tests!\n\n  end";
    let ids = e.tokenizer.encode(text).unwrap();
    assert_eq!(ids[0], 297, "BOS first: {ids:?}");
    assert_eq!(e.tokenizer.decode(&ids).unwrap(), text);
    // Special tokens written in the text (chat templates) become their ids.
    let ids = e.tokenizer.encode("hi<|end_of_text|>").unwrap();
    assert_eq!(ids.last(), Some(&298));
}

#[tokio::test(flavor = "current_thread")]
async fn chunked_prefill_gives_the_same_tokens() {
    let dir = gen(Preset::Tiny, 8);
    let engine = Arc::new(Engine::open(dir.path(), "cpu", None).unwrap());
    let prompt = engine.tokenizer.encode("a prompt long enough to need several chunks").unwrap();
    assert!(prompt.len() > 10);
    let run = |chunk: usize| {
        let (engine, prompt) = (engine.clone(), prompt.clone());
        async move {
            let metrics = Arc::new(Metrics::default());
            let (handle, _task) = batcher::spawn_with(engine, metrics.clone(), batcher::BatcherConfig { prefill_chunk: chunk, ..Default::default() });
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let sampling = SamplingParams { temperature: 0.9, top_p: 1.0, seed: Some(77), ..SamplingParams::default() };
            handle.submit(GenRequest { prompt, max_tokens: 5, sampling, stop: vec![], events: tx, options: Default::default() }).unwrap();
            let mut text = String::new();
            while let Some(e) = rx.recv().await {
                match e {
                    GenEvent::Delta(d) => text.push_str(&d),
                    GenEvent::Done(f) => {
                        assert_eq!(f.completion_tokens, 5);
                        break;
                    }
                    GenEvent::Prompt(_) | GenEvent::Tokens(_) => {}
                }
            }
            let steps = metrics.json()["paths"].as_array().unwrap().iter().find(|p| p["family"] == "attention").unwrap()["count"].as_u64().unwrap();
            (text, steps)
        }
    };
    let (whole, whole_steps) = run(512).await;
    let (chunked, chunked_steps) = run(3).await;
    assert_eq!(whole, chunked);
    assert_eq!(whole_steps, 5);
    assert_eq!(chunked_steps as usize, prompt.len().div_ceil(3) + 4);
}

#[test]
fn sharded_checkpoint_with_index_loads_the_same_model() {
    let dir = gen(Preset::TinyMoe, 6);
    let whole = Model::load(dir.path()).unwrap();
    // Split the tensors over two shards and write the HF index.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<_> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        part.iter().for_each(|n| drop(map.insert(n.clone(), file.clone().into())));
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let sharded = Model::load(dir.path()).unwrap();
    let run = |m: &Model| cpu::forward(m, &mut [SeqInput { tokens: &[1, 2, 3], cache: &mut KvCache::new(&m.config) }]).unwrap();
    assert_eq!(run(&whole), run(&sharded));
    // A missing shard is named.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::write(&index, "{\"weight_map\": 3}").unwrap();
    assert!(Model::load(dir.path()).unwrap_err().to_string().contains("weight_map"));
}
