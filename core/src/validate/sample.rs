//! Checks of `sample_tokens` on fresh random logits against the f64 reference of
//! [`crate::reference::sampling`]: eight sequences, each with its own rule (greedy, temperature,
//! min_p, top_k, top_p, top_k + top_p, a hot temperature, a row full of ties), each drawn with
//! [`DRAWS`] fresh uniforms. A token differing from the reference's counts as a mismatch unless
//! the reference picks it with u moved by [`crate::reference::sampling::U_TOLERANCE`] (the
//! kernel's f32 weights put CDF boundaries that close to where f64 puts them).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::CheckedRun;
use crate::cache::CacheEntry;
use crate::check::Deltas;
use crate::gpu::{Gpu, GpuError, SampleTokens};
use crate::reference::sampling::{agrees, DrawRule};

/// Launches per check, each with a fresh uniform per sequence.
pub const DRAWS: usize = 16;

/// The rules of the eight checked sequences.
pub fn checked_rules() -> [DrawRule; 8] {
    let r = |temperature, top_p, min_p, top_k| DrawRule { temperature, top_p, min_p, top_k };
    [
        DrawRule::GREEDY,
        r(0.7, 1.0, 0.0, 0),
        r(1.0, 1.0, 0.05, 0),
        r(1.0, 1.0, 0.0, 40),
        r(0.8, 0.9, 0.0, 0),
        r(1.0, 0.8, 0.0, 50),
        r(2.5, 0.95, 0.0, 0),
        r(1.0, 0.7, 0.0, 0),
    ]
}

/// Checks a `sample_tokens` entry: deltas count mismatched picks (max_abs = max_rel = how many)
/// and unwritten tokens; the output is every pick.
pub fn check_sample_tokens(gpu: &Gpu, entry: &CacheEntry, seed: u64, _rel_floor: f64) -> Result<CheckedRun, GpuError> {
    let op = SampleTokens::new(gpu, entry)?;
    let rules = checked_rules();
    let (seqs, v) = (rules.len(), op.v);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut logits: Vec<f32> = (0..seqs * v).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    // The last row in steps of 1/2: ties at every threshold.
    logits[(seqs - 1) * v..].iter_mut().for_each(|l| *l = (*l * 2.0).round() / 2.0);
    let rows: Vec<f32> = rules.iter().flat_map(|r| r.as_row()).collect();
    let (d_logits, d_rules) = (gpu.upload(&logits)?, gpu.upload(&rows)?);
    let mut d_u = gpu.zeros::<f64>(seqs)?;
    let mut d_out = gpu.zeros::<i32>(seqs)?;
    let (mut mismatched, mut unwritten, mut output) = (0usize, 0usize, Vec::new());
    for _ in 0..DRAWS {
        let u: Vec<f64> = (0..seqs).map(|_| rng.random::<f64>()).collect();
        gpu.write(&u, &mut d_u)?;
        gpu.write(&vec![-1i32; seqs], &mut d_out)?;
        op.launch(gpu, seqs, &d_logits, &d_rules, &d_u, &mut d_out)?;
        gpu.sync()?;
        let got = gpu.download(&d_out)?;
        for (s, &g) in got.iter().enumerate() {
            output.push(g as u32);
            if g < 0 {
                unwritten += 1;
                continue;
            }
            if !agrees(&logits[s * v..(s + 1) * v], &rules[s], u[s], g as u32) {
                mismatched += 1;
            }
        }
    }
    let m = mismatched as f64;
    Ok(CheckedRun { deltas: Deltas { max_abs: m, max_rel: m, non_finite: 0, unwritten, count: seqs * DRAWS }, output })
}
