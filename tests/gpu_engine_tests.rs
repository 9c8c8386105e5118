//! GPU tests of the CUDA engine backend (H100 via scripts/gpu-check): on the same checkpoint,
//! CUDA logits against the CPU reference backend over a mixed prefill + decode batch, graph
//! replay bit-identical to direct launches, KV slots reused and exhausted with a clear error.
//! The checkpoint is a generated `tiny` model, or MANGROVE_GPU_MODEL (e.g. the bitnet-2b preset).
//! Without a GPU they report "skipped: no GPU".

mod common;

use std::path::Path;
use std::sync::Arc;

use mangrove::check::Deltas;
use mangrove::engine::backend::{ForwardError, KvCache, SeqInput};
use mangrove::engine::cuda::CudaBackend;
use mangrove::engine::genmodel::{generate, Preset};
use mangrove::engine::model::Model;
use mangrove::engine::cpu::CpuBackend;
use mangrove::engine::Backend;
use mangrove::model_config::ModelConfig;
use mangrove::plan::plan;
use mangrove::template::Catalog;
use mangrove::provision::{provision, KernelSource};
use mangrove::tuning_db::TuningDb;

fn shipped_db() -> TuningDb {
    TuningDb::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning_db/h100")).unwrap()
}

/// The CUDA backend for `dir` with the plan's kernels from the shipped DB.
fn cuda_backend(gpu: mangrove::gpu::Gpu, dir: &Path, model: &Model, jit_dir: &Path, max_seqs: usize) -> CudaBackend {
    cuda_backend_with(gpu, dir, model, jit_dir, max_seqs, &[])
}

/// [`cuda_backend`] with some kernels' parameters overridden: (family, param, value).
fn cuda_backend_with(
    gpu: mangrove::gpu::Gpu,
    dir: &Path,
    model: &Model,
    jit_dir: &Path,
    max_seqs: usize,
    overrides: &[(&str, &str, i64)],
) -> CudaBackend {
    let shapes = ModelConfig::from_model_dir(dir).unwrap();
    let mut planned = plan(&Catalog::embedded(), &shapes, &shipped_db(), gpu.info().arch, max_seqs as i64);
    for p in &mut planned {
        for (family, param, v) in overrides {
            if p.family.as_str() == *family {
                p.request.params.insert(param.to_string(), *v);
            }
        }
    }
    let jit = common::jit_in(jit_dir);
    let got = provision(&planned, &KernelSource::Jit(jit), &|| unreachable!("the local JIT serves every kernel")).unwrap();
    let context = mangrove::step::cuda_context(&shapes);
    CudaBackend::new(gpu, model, &got.entries, max_seqs, context).unwrap()
}

/// Prompt lengths of the dense comparisons: the 300-token one spans three attention splits
/// (MIN_CHUNK 128), so the split-K combine is checked too.
const DENSE_PROMPTS: &[usize] = &[7, 1, 300];

fn model_dir(tmp: &Path) -> std::path::PathBuf {
    match std::env::var_os("MANGROVE_GPU_MODEL") {
        Some(d) => d.into(),
        None => generated(tmp, Preset::Tiny, 11).0,
    }
}

/// A random checkpoint of `preset` written under `tmp`, and the model loaded from it.
fn generated(tmp: &Path, preset: Preset, seed: u64) -> (std::path::PathBuf, Model) {
    let dir = tmp.join(format!("{preset:?}").to_lowercase());
    generate(preset, &dir, seed).unwrap();
    let model = Model::load(&dir).unwrap();
    (dir, model)
}

/// Runs prompts of `lens` tokens (one mixed prefill step), then greedy decode steps with the
/// reference backend's tokens fed to both; returns the worst logit deltas and every CUDA logit.
fn compare(cuda: &dyn Backend, cpu: &dyn Backend, lens: &[usize], steps: usize) -> (Deltas, Vec<Vec<f64>>) {
    let vocab = cpu.config().vocab as u32;
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(s, &n)| (0..n as u32).map(|i| (i * 37 + s as u32 * 101 + 5) % vocab).collect()).collect();
    let mut cc: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(cpu.config())).collect();
    let mut gc: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(cuda.config())).collect();
    let mut feed = prompts.clone();
    let mut worst = Deltas::default();
    let mut all = Vec::new();
    for _ in 0..=steps {
        let mut a: Vec<SeqInput> = feed.iter().zip(cc.iter_mut()).map(|(t, c)| SeqInput { tokens: t, cache: c }).collect();
        let want = cpu.forward(&mut a).unwrap().0;
        let mut b: Vec<SeqInput> = feed.iter().zip(gc.iter_mut()).map(|(t, c)| SeqInput { tokens: t, cache: c }).collect();
        let got = cuda.forward(&mut b).unwrap().0;
        for (g, w) in got.iter().zip(&want) {
            worst = worst.worst(Deltas::of_f64(g, w, 1e-1));
        }
        feed = want.iter().map(|l| vec![mangrove::engine::sampling::argmax(l)]).collect();
        all.extend(got);
    }
    (worst, all)
}

#[test]
fn cuda_logits_match_cpu_reference_and_graphs_match_direct_launches() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let model = Model::load(&dir).unwrap();
    let cuda = cuda_backend(gpu, &dir, &model, &tmp.path().join("cache"), 4);
    let cpu = CpuBackend::new(Arc::new(model.clone()));
    let (d, graph_logits) = compare(&cuda, &cpu, DENSE_PROMPTS, 4);
    // How far the f64 reference itself moves when its embeddings move by 1e-6: deep random
    // ternary models amplify any int8 rounding flip, so this bounds what f32 can match.
    let mut shaken = model.clone();
    // Non-uniform, so the first RMSNorm does not cancel it.
    shaken.embed.iter_mut().enumerate().for_each(|(i, v)| *v *= 1.0 + 1e-6 * ((i % 7) as f32 - 3.0));
    let (sensitivity, _) = compare(&CpuBackend::new(Arc::new(shaken)), &cpu, DENSE_PROMPTS, 4);
    println!("CUDA vs CPU logits ({}): {d}", dir.display());
    println!("CPU vs CPU with embeddings × (1 + k·1e-6), k in -3..=3: {sensitivity}");
    assert_eq!(d.non_finite, 0);
    // f32 arithmetic against f64, identical int8 activations except where an f32 rounding flips
    // a quantization step: errors relative to 10% of the largest logit.
    let gate = 2e-2f64.max(3.0 * sensitivity.max_rel);
    assert!(d.max_rel < gate, "CUDA logits differ from the CPU reference: {d} (gate {gate:.2e})");
    let direct = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("cache2"), 4).with_graphs(false);
    let (_, direct_logits) = compare(&direct, &cpu, DENSE_PROMPTS, 4);
    assert_eq!(graph_logits, direct_logits, "graph replay must equal direct launches bit for bit");
}

#[test]
fn split_attention_matches_one_split() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = generated(tmp.path(), Preset::Tiny, 11);
    let split = cuda_backend_with(gpu, &dir, &model, &tmp.path().join("c1"), 4, &[("attention", "MIN_CHUNK", 16)]);
    let one = cuda_backend_with(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("c2"), 4, &[("attention", "SPLITS", 1)]);
    // The reference here is the one-split kernel: same f32 math, only the sum is reassociated.
    let (d, _) = compare(&split, &one, DENSE_PROMPTS, 4);
    println!("16 splits (MIN_CHUNK 16) vs 1 split: {d}");
    let cpu = CpuBackend::new(Arc::new(model.clone()));
    let (d1, _) = compare(&one, &cpu, DENSE_PROMPTS, 4);
    println!("1 split vs CPU: {d1}");
    assert!(d.max_rel < 1e-4, "split-K attention differs from one split: {d}");
}

#[test]
fn cuda_moe_logits_match_cpu_reference_and_graphs_match_direct_launches() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = generated(tmp.path(), Preset::TinyMoe, 5);
    let cuda = cuda_backend(gpu, &dir, &model, &tmp.path().join("cache"), 4);
    let cpu = CpuBackend::new(Arc::new(model.clone()));
    // Short prompts: top-k routing is discontinuous, and over many tokens an f32-vs-f64 near-tie
    // between two experts' router scores eventually picks a different expert (seen at 48 rows).
    let (d, graph_logits) = compare(&cuda, &cpu, &[7, 1, 12], 4);
    println!("CUDA vs CPU logits (tiny-moe): {d}");
    assert_eq!(d.non_finite, 0);
    assert!(d.max_rel < 2e-2, "CUDA MoE logits differ from the CPU reference: {d}");
    // MoE steps route on the GPU: captured graphs replay them bit for bit.
    let direct = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("cache2"), 4).with_graphs(false);
    let (_, direct_logits) = compare(&direct, &cpu, &[7, 1, 12], 4);
    assert_eq!(graph_logits, direct_logits, "MoE graph replay must equal direct launches bit for bit");
    let report = cuda.forward(&mut [SeqInput { tokens: &[1, 2], cache: &mut KvCache::new(cuda.config()) }]).unwrap().1;
    for f in [mangrove::step::Family::MoeRoute, mangrove::step::Family::MoeGateUp, mangrove::step::Family::MoeDown] {
        assert!(report.paths.contains(&(f, "cuda_grouped_m2")), "{f}: {:?}", report.paths);
    }
}

#[test]
fn cuda_qwen3_moe_shapes_match_cpu_reference() {
    // The Qwen3-30B-A3B preset at 2 layers: 128 experts of 768, top-8, H 2048, head_dim 128 —
    // the grouped kernels at real shapes, over a prefill that spans several buckets.
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3-moe");
    mangrove::engine::genmodel::generate_with(Preset::Qwen3Moe, &dir, 21, Some(2)).unwrap();
    let model = Model::load(&dir).unwrap();
    let cuda = cuda_backend(gpu, &dir, &model, &tmp.path().join("cache"), 4);
    let cpu = CpuBackend::new(Arc::new(model.clone()));
    let (d, graph_logits) = compare(&cuda, &cpu, &[5, 1, 9], 3);
    println!("CUDA vs CPU logits (qwen3-moe, 2 layers): {d}");
    assert_eq!(d.non_finite, 0);
    assert!(d.max_rel < 2e-2, "CUDA MoE logits differ from the CPU reference: {d}");
    let direct = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("cache2"), 4).with_graphs(false);
    let (_, direct_logits) = compare(&direct, &cpu, &[5, 1, 9], 3);
    assert_eq!(graph_logits, direct_logits, "MoE graph replay must equal direct launches bit for bit");
}

#[test]
fn kv_slots_are_reused_and_exhaustion_is_an_error() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = generated(tmp.path(), Preset::Tiny, 3);
    let cuda = cuda_backend(gpu, &dir, &model, &tmp.path().join("cache"), 2);
    let run = |caches: &mut [KvCache]| {
        let toks = [1u32, 2, 3];
        let mut b: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { tokens: &toks, cache: c }).collect();
        cuda.forward(&mut b).map(|r| r.0)
    };
    let fresh = |n: usize| (0..n).map(|_| KvCache::new(cuda.config())).collect::<Vec<_>>();
    let mut two = fresh(2);
    let first = run(&mut two).unwrap();
    let mut three = fresh(1);
    assert_eq!(run(&mut three).unwrap_err(), ForwardError::NoKvSlot { seq: 0, slots: 2 });
    drop(two);
    // Freed slots serve new sequences, and a new sequence sees none of the old one's cache.
    let mut again = fresh(2);
    assert_eq!(run(&mut again).unwrap(), first);
    // Past the context: refused before anything runs.
    let long = vec![1u32; cuda.config().max_positions + 1];
    let mut c = KvCache::new(cuda.config());
    let err = cuda.forward(&mut [SeqInput { tokens: &long, cache: &mut c }]).unwrap_err();
    assert!(matches!(err, ForwardError::ContextFull { .. }), "{err}");
    assert!(c.is_empty());
}

/// Greedy tokens of one sequence: a prompt of `len` tokens, then `steps` batch-1 decode steps;
/// with each step's logits.
fn greedy(b: &dyn Backend, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f64>>) {
    let mut cache = KvCache::new(b.config());
    let mut feed = prompt.to_vec();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..=steps {
        let l = b.forward(&mut [SeqInput { tokens: &feed, cache: &mut cache }]).unwrap().0.remove(0);
        let t = mangrove::engine::sampling::argmax(&l);
        tokens.push(t);
        logits.push(l);
        feed = vec![t];
    }
    (tokens, logits)
}

/// The gap between the largest and second-largest logit, relative to the largest magnitude.
fn top2_margin(l: &[f64]) -> f64 {
    let mut s: Vec<f64> = l.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    (s[0] - s[1]) / s.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

#[test]
fn fused_layer_matches_cpu_reference_unfused_step_and_direct_launches() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let model = Model::load(&dir).unwrap();
    let fused = cuda_backend(gpu, &dir, &model, &tmp.path().join("c1"), 1);
    if !fused.fused_layer() {
        eprintln!("skipped: the fused layer's grid does not fit on this GPU (the unfused step runs)");
        return;
    }
    let report = fused.forward(&mut [SeqInput { tokens: &[3], cache: &mut KvCache::new(fused.config()) }]).unwrap().1;
    assert!(report.paths.contains(&(mangrove::step::Family::DecodeLayer, "cuda_fused")), "{:?}", report.paths);
    // Against the f64 reference: a prompt (an unfused prefill step), then batch-1 fused steps.
    let cpu = CpuBackend::new(Arc::new(model.clone()));
    let (d, graph_logits) = compare(&fused, &cpu, &[7], 8);
    let mut shaken = model.clone();
    shaken.embed.iter_mut().enumerate().for_each(|(i, v)| *v *= 1.0 + 1e-6 * ((i % 7) as f32 - 3.0));
    let (sensitivity, _) = compare(&CpuBackend::new(Arc::new(shaken)), &cpu, &[7], 8);
    println!("fused CUDA vs CPU logits ({}): {d}; CPU sensitivity {sensitivity}", dir.display());
    assert_eq!(d.non_finite, 0);
    let gate = 2e-2f64.max(3.0 * sensitivity.max_rel);
    assert!(d.max_rel < gate, "fused CUDA logits differ from the CPU reference: {d} (gate {gate:.2e})");
    // Graph replay of the fused step equals its direct launches bit for bit.
    let direct = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("c2"), 1).with_graphs(false);
    assert_eq!(graph_logits, compare(&direct, &cpu, &[7], 8).1, "graph replay must equal direct launches bit for bit");
    // Greedy tokens of the fused and the unfused step on 8 prompts × 32 tokens: identical, or
    // where they part, the unfused step's top-2 margin there is within the gate.
    let unfused = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("c3"), 1).without_fused_layer();
    let vocab = model.config.vocab as u32;
    let mut worst = Deltas::default();
    for s in 0..8u32 {
        let prompt: Vec<u32> = (0..(1 + 5 * s)).map(|i| (i * 37 + s * 101 + 5) % vocab).collect();
        let (ft, fl) = greedy(&fused, &prompt, 32);
        let (ut, ul) = greedy(&unfused, &prompt, 32);
        let same = ft.iter().zip(&ut).take_while(|(a, b)| a == b).count();
        for (f, u) in fl.iter().zip(&ul).take(same + 1) {
            worst = worst.worst(Deltas::of_f64(f, u, 1e-1));
        }
        if same < ft.len() {
            let margin = top2_margin(&ul[same]);
            println!("prompt {s}: tokens part at step {same} (unfused top-2 margin {margin:.2e})");
            assert!(margin < gate, "prompt {s}: fused and unfused greedy tokens part at step {same} with a top-2 margin of {margin:.2e}");
        }
    }
    println!("fused vs unfused step logits (8 prompts × 33 steps, up to where tokens part): {worst}");
    assert!(worst.max_rel < gate, "fused and unfused logits differ: {worst}");
}

/// GPU sampling in the step's graph: each pick is what the reference sampler picks from the
/// same step's logits (a twin backend fed the same tokens) with the same uniform — greedy
/// exactly, sampled up to a CDF boundary within `U_TOLERANCE` — and decode batches run the LM
/// head on cuBLAS and the sampler on the GPU.
#[test]
fn gpu_sampling_picks_what_the_logits_say() {
    use mangrove::engine::sampling::{Draw, SamplingParams};
    use mangrove::reference::sampling::agrees;
    use mangrove::step::Family;
    let Some(gpu) = common::gpu_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = generated(tmp.path(), Preset::Tiny, 21);
    let sampled = cuda_backend(gpu, &dir, &model, &tmp.path().join("c1"), 4);
    let twin = cuda_backend(common::gpu_or_skip().unwrap(), &dir, &model, &tmp.path().join("c2"), 4);
    let params = [
        SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        SamplingParams { temperature: 0.8, top_p: 0.9, ..SamplingParams::default() },
        SamplingParams { temperature: 1.2, top_k: 20, min_p: 0.01, ..SamplingParams::default() },
    ];
    let vocab = model.config.vocab as u32;
    let mut feed: Vec<Vec<u32>> = [9usize, 1, 30].iter().map(|&n| (0..n as u32).map(|i| (i * 53 + n as u32) % vocab).collect()).collect();
    let mut ca: Vec<KvCache> = feed.iter().map(|_| KvCache::new(sampled.config())).collect();
    let mut cb: Vec<KvCache> = feed.iter().map(|_| KvCache::new(twin.config())).collect();
    for step in 0..8 {
        let draws: Vec<Draw> = params.iter().enumerate().map(|(s, &p)| Draw { params: p, u: ((step * 7 + s * 3) as f64 * 0.1234567).fract() }).collect();
        let mut a: Vec<SeqInput> = feed.iter().zip(ca.iter_mut()).map(|(t, c)| SeqInput { tokens: t, cache: c }).collect();
        let (tokens, report) = sampled.forward_sample(&mut a, &draws).unwrap();
        let mut b: Vec<SeqInput> = feed.iter().zip(cb.iter_mut()).map(|(t, c)| SeqInput { tokens: t, cache: c }).collect();
        let logits = twin.forward(&mut b).unwrap().0;
        for (s, (l, d)) in logits.iter().zip(&draws).enumerate() {
            let l32: Vec<f32> = l.iter().map(|&v| v as f32).collect();
            assert!(agrees(&l32, &d.params.rule(), d.u, tokens[s]), "step {step} seq {s}: GPU picked {} for {d:?}", tokens[s]);
        }
        assert!(report.paths.contains(&(Family::Sample, "cuda_op")), "{:?}", report.paths);
        if step > 0 {
            assert!(report.paths.contains(&(Family::LmHead, "cublas_bf16")), "decode batch without the cuBLAS head: {:?}", report.paths);
        }
        feed = tokens.iter().map(|&t| vec![t]).collect();
    }
}
