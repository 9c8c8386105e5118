//! The SIMD CPU backend against the f64 reference: each kernel path this CPU supports against
//! the scalar path (bit for bit: integer sums are exact) and the f64 reference, on fresh random
//! inputs (never zeros), reporting max_abs / max_rel; then whole models (tiny, tiny-moe and a
//! 2-layer model of bitnet-2b widths from gen-model): `SimdCpuBackend` logits against the
//! reference backend within [`LOGIT_TOL`] (or 3× the reference's own sensitivity), and greedy
//! tokens identical (or, at a divergence, the reference's top-2 margin below the gate, reported).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mangrove::engine::backend::{Backend, KvCache, SeqInput};
use mangrove::engine::cpu::{bitlinear, CpuBackend};
use mangrove::engine::cpu_simd::kernels::{scalar, Dense, Kernels};
use mangrove::engine::cpu_simd::ops::quantize;
use mangrove::engine::cpu_simd::pool::{dense_linear, ternary_linear, Pool, QuantRows, Split};
use mangrove::engine::cpu_simd::repack::{padded, PackedTernary};
use mangrove::engine::cpu_simd::{CpuTunables, Isa, SimdCpuBackend};
use mangrove::engine::genmodel::{generate, generate_with, Preset};
use mangrove::engine::model::{Model, TernaryLinear};
use mangrove::check::Deltas;
use mangrove::reference::{pack_ternary, ternary_linear as ref_ternary};

/// Whole-model logits: max_rel (against max(|ref|, 10% of the largest logit)) below this, or
/// below three times the reference's own sensitivity to a 1e-6 change of its embeddings. The
/// backends differ by f32 vs f64 rounding, and where that moves an activation across an int8
/// rounding boundary its int8 value differs by one — the gate of the CUDA engine test.
const LOGIT_TOL: f64 = 2e-2;

fn random_linear(rng: &mut StdRng, n: usize, k: usize) -> (Vec<i8>, TernaryLinear) {
    let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-1i8..=1)).collect();
    let scale = rng.random_range(0.5f64..2.0);
    (w.clone(), TernaryLinear { packed: pack_ternary(&w, n, k), n, k, scale })
}

/// Random int8 rows, no all-zero row, padded to kp with zeros.
fn random_q(rng: &mut StdRng, m: usize, k: usize) -> Vec<i8> {
    let kp = padded(k);
    let mut q = vec![0i8; m * kp];
    for t in 0..m {
        for c in 0..k {
            q[t * kp + c] = rng.random_range(-128i16..=127) as i8;
        }
        q[t * kp] = q[t * kp].max(1);
    }
    q
}

fn stats(got: &[f64], want: &[f64]) -> (f64, f64) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_abs = got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    (max_abs, max_abs / scale)
}

fn kernels(isa: Isa) -> Option<Kernels> {
    let k = Kernels::new(isa, 256);
    if k.is_none() {
        eprintln!("{isa}: skipped (this CPU or build lacks it)");
    }
    k
}

#[test]
fn each_ternary_path_equals_scalar_and_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(n, k) in &[(16, 64), (40, 200), (96, 2560), (12, 6912)] {
        let (_, lin) = random_linear(&mut rng, n, k);
        let p = PackedTernary::from_linear(&lin, mangrove::model_config::ScaleConvention::Multiply);
        for m in [1usize, 2, 3, 5, 8] {
            let q = random_q(&mut rng, m, k);
            let mut want = vec![0i32; n / 4 * m * 4];
            scalar::ternary_block(&p.data, p.kp, n / 4, &q, m, &mut want);
            // f64 reference of Σ w·x, from the HF layout.
            let qf: Vec<f64> = (0..m).flat_map(|t| q[t * p.kp..][..k].iter().map(|&v| v as f64)).collect();
            let reference = ref_ternary(&lin.packed, n, k, &qf, m, 1.0);
            let xsum: Vec<i32> = (0..m).map(|t| q[t * p.kp..][..k].iter().map(|&v| v as i32).sum()).collect();
            for isa in Isa::ALL {
                for kb in [32, 256, 2016] {
                    let Some(kern) = Kernels::new(isa, kb) else { continue };
                    let mut got = vec![-1i32; want.len()];
                    kern.ternary_block(&p.data, p.kp, n / 4, &q, m, &mut got);
                    assert_eq!(got, want, "{isa} kblock {kb} n {n} k {k} m {m}: raw sums differ from the scalar path");
                }
            }
            for t in 0..m {
                for r in 0..n {
                    let v = want[((r / 4) * m + t) * 4 + r % 4] - xsum[t];
                    assert_eq!(v as f64, reference[t * n + r], "scalar vs f64 reference, row {r} token {t}");
                }
            }
        }
    }
    for isa in Isa::ALL {
        eprintln!("{isa}: {}", if isa.is_supported() { "tested, bit-exact vs scalar" } else { "skipped (not on this CPU/build)" });
    }
}

#[test]
fn each_linear_path_matches_the_f64_bitlinear() {
    let mut rng = StdRng::seed_from_u64(8);
    let pool = Pool::new(2).unwrap();
    let split = Split { rows_per_task: 3, lm_rows_per_task: 5 };
    let (n, k) = (3840, 2560);
    let (_, lin) = random_linear(&mut rng, n, k);
    let p = PackedTernary::from_linear(&lin, mangrove::model_config::ScaleConvention::Multiply);
    for m in [1usize, 4, 9] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = bitlinear(&lin, mangrove::model_config::ScaleConvention::Multiply, &xf, m);
        let kp = p.kp;
        let (mut q, mut inv_s, mut sum) = (vec![0i8; m * kp], vec![0f32; m], vec![0i32; m]);
        for t in 0..m {
            (inv_s[t], sum[t]) = quantize(&x[t * k..][..k], &mut q[t * kp..][..kp]);
        }
        for isa in Isa::ALL {
            let Some(kern) = kernels(isa) else { continue };
            let mut y = vec![f32::NAN; m * n];
            pool.install(|| ternary_linear(&kern, &split, &p, QuantRows { q: &q, inv_s: &inv_s, sum: &sum }, m, &mut y));
            let got: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            let (max_abs, max_rel) = stats(&got, &want);
            eprintln!("ternary linear {n}x{k} m {m} {isa}: max_abs {max_abs:.3e} max_rel {max_rel:.3e}");
            assert!(max_rel < 1e-2, "{isa} m {m}: max_rel {max_rel}");
        }
    }
}

#[test]
fn each_lm_head_path_matches_f64() {
    let mut rng = StdRng::seed_from_u64(9);
    let pool = Pool::new(2).unwrap();
    let split = Split { rows_per_task: 4, lm_rows_per_task: 37 };
    let (rows, cols) = (1000, 2568);
    let w: Vec<f32> = (0..rows * cols).map(|_| half::bf16::from_f32(rng.random_range(-0.1f32..0.1)).to_f32()).collect();
    let d = Dense::new(&w);
    assert!(matches!(d, Dense::Bf16(_)));
    for m in [1usize, 3, 8] {
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2f32..2.0)).collect();
        let (wr, xr) = (&w, &x);
        let want: Vec<f64> = (0..m)
            .flat_map(|t| (0..rows).map(move |r| (0..cols).map(|c| wr[r * cols + c] as f64 * xr[t * cols + c] as f64).sum::<f64>()))
            .collect();
        for isa in Isa::ALL {
            let Some(kern) = kernels(isa) else { continue };
            let mut y = vec![f32::NAN; m * rows];
            pool.install(|| dense_linear(&kern, &split, &d, rows, cols, &x, m, &mut y));
            let got: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            let (max_abs, max_rel) = stats(&got, &want);
            eprintln!("lm head {rows}x{cols} m {m} {isa}: max_abs {max_abs:.3e} max_rel {max_rel:.3e}");
            assert!(max_rel < 1e-5, "{isa} m {m}: max_rel {max_rel}");
        }
    }
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Top-1 minus top-2 of `v`.
fn margin(v: &[f64]) -> f64 {
    let a = argmax(v);
    let second = v.iter().enumerate().filter(|&(i, _)| i != a).fold(f64::NEG_INFINITY, |m, (_, &x)| m.max(x));
    v[a] - second
}

/// What one backend gave against the reference over greedy decodes.
#[derive(Default)]
struct Agreement {
    deltas: Deltas,
    /// Steps whose greedy token differed, with the reference's top-2 margin over its logit scale.
    divergences: Vec<f64>,
    steps: usize,
    /// Steps whose logits were within [`LOGIT_TOL`].
    within: usize,
}

/// The reference's logits of each prompt's prefill and `steps` greedy decode steps (its own
/// tokens), with the tokens it fed.
struct Run {
    feeds: Vec<Vec<Vec<u32>>>,
    logits: Vec<Vec<Vec<f64>>>,
}

fn reference_run(reference: &dyn Backend, prompts: &[Vec<u32>], steps: usize) -> Run {
    let mut run = Run { feeds: Vec::new(), logits: Vec::new() };
    for p in prompts {
        let mut cache = KvCache::new(reference.config());
        let (mut feeds, mut logits) = (vec![p.clone()], Vec::new());
        for step in 0..=steps {
            let l = reference.forward(&mut [SeqInput { tokens: &feeds[step], cache: &mut cache }]).unwrap().0.remove(0);
            feeds.push(vec![argmax(&l) as u32]);
            logits.push(l);
        }
        feeds.pop();
        run.feeds.push(feeds);
        run.logits.push(logits);
    }
    run
}

/// Feeds `got` the reference's tokens (so one flip does not derail the rest) and compares its
/// logits; deltas relative to max(|ref|, 10% of the largest logit), as the GPU engine test.
fn agreement(got: &dyn Backend, run: &Run) -> Agreement {
    let mut a = Agreement::default();
    for (feeds, want) in run.feeds.iter().zip(&run.logits) {
        let mut cache = KvCache::new(got.config());
        for (feed, lr) in feeds.iter().zip(want) {
            let lg = got.forward(&mut [SeqInput { tokens: feed, cache: &mut cache }]).unwrap().0.remove(0);
            let d = Deltas::of_f64(&lg, lr, 0.1);
            a.within += usize::from(d.max_rel < LOGIT_TOL);
            a.deltas = a.deltas.worst(d);
            a.steps += 1;
            if argmax(&lg) != argmax(lr) {
                let scale = lr.iter().fold(0f64, |m, v| m.max(v.abs()));
                a.divergences.push(margin(lr) / scale);
            }
        }
    }
    a
}

/// SIMD (each of `isas`) against the reference on `prompts`; the gate is [`LOGIT_TOL`] or three
/// times how far the reference itself moves when its embeddings move by 1e-6 on the same
/// steps (random ternary models amplify any int8 rounding flip), whichever is larger; how many
/// steps were within [`LOGIT_TOL`] is reported (a flip stays in the KV cache for the rest of
/// its prompt).
fn check_model(dir: &std::path::Path, prompts: &[Vec<u32>], steps: usize, isas: &[Isa], what: &str) {
    let model = Model::load(dir).unwrap();
    let run = reference_run(&CpuBackend::new(Arc::new(model.clone())), prompts, steps);
    let sensitivity = {
        let mut shaken = model.clone();
        shaken.embed.iter_mut().enumerate().for_each(|(i, v)| *v *= 1.0 + 1e-6 * ((i % 7) as f32 - 3.0));
        agreement(&CpuBackend::new(Arc::new(shaken)), &run).deltas.max_rel
    };
    let gate = LOGIT_TOL.max(3.0 * sensitivity);
    for &isa in isas {
        let simd = SimdCpuBackend::new(&model, CpuTunables::defaults(isa)).unwrap();
        let a = agreement(&simd, &run);
        let worst_margin = a.divergences.iter().fold(0f64, |m, &v| m.max(v));
        eprintln!(
            "{what} {isa}: {} prompts x {steps} tokens: logits {} (gate {gate:.2e}, reference sensitivity {sensitivity:.2e}), \
             {}/{} steps within {LOGIT_TOL:.0e}; greedy tokens identical at {}/{} steps, largest top-2 margin at a divergence \
             {worst_margin:.2e} of the logit scale",
            prompts.len(),
            a.deltas,
            a.within,
            a.steps,
            a.steps - a.divergences.len(),
            a.steps
        );
        assert_eq!(a.deltas.non_finite, 0);
        assert!(a.deltas.max_rel < gate, "{what} {isa}: logits {} (gate {gate:.2e})", a.deltas);
        assert!(worst_margin <= gate, "{what} {isa}: greedy tokens differ where the reference's top-2 margin is {worst_margin:.2e}");
    }
}

fn prompts(vocab: usize, count: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

#[test]
fn tiny_and_tiny_moe_logits_and_greedy_tokens_match_the_reference() {
    for preset in [Preset::Tiny, Preset::TinyMoe] {
        let dir = tempfile::tempdir().unwrap();
        generate(preset, dir.path(), 21).unwrap();
        check_model(dir.path(), &prompts(300, 8, 6, 1), 32, &Isa::supported(), preset.name());
    }
}

#[test]
fn bitnet_2b_widths_two_layers_match_the_reference() {
    // The widest path only: every path's ternary sums equal the scalar ones bit for bit (above).
    let dir = tempfile::tempdir().unwrap();
    generate_with(Preset::Bitnet2b, dir.path(), 5, Some(2)).unwrap();
    check_model(dir.path(), &prompts(128256, 1, 5, 2), 3, &[Isa::best()], "bitnet-2b widths, 2 layers");
}

#[test]
fn batched_and_chunked_steps_equal_one_sequence_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    generate(Preset::Tiny, dir.path(), 3).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let simd = SimdCpuBackend::new(&model, CpuTunables::defaults(Isa::best())).unwrap();
    let (a, b) = ([1u32, 2, 3, 4, 5], [200u32, 7]);
    let solo = |t: &[u32]| simd.forward(&mut [SeqInput { tokens: t, cache: &mut KvCache::new(&model.config) }]).unwrap().0.remove(0);
    let (ca, cb) = (&mut KvCache::new(&model.config), &mut KvCache::new(&model.config));
    let both = simd.forward(&mut [SeqInput { tokens: &a, cache: ca }, SeqInput { tokens: &b, cache: cb }]).unwrap().0;
    assert_eq!(both[0], solo(&a));
    assert_eq!(both[1], solo(&b));
    // Prefill in two chunks equals one.
    let c = &mut KvCache::new(&model.config);
    simd.forward(&mut [SeqInput { tokens: &a[..2], cache: c }]).unwrap();
    let chunked = simd.forward(&mut [SeqInput { tokens: &a[2..], cache: c }]).unwrap().0.remove(0);
    assert_eq!(chunked, solo(&a));
    assert_eq!(c.len(), a.len());
}

