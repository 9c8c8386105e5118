//! f64 references of the MoE stages with ternary experts: gate_up (for every routed
//! (token, slot) pair, `act(gate) * up` of its expert, each a [`ternary_linear`] of the token),
//! down (each pair's row through its expert's down projection) and the top-k routing.

use rayon::prelude::*;

use super::ternary_linear;

/// Shape of one MoE gate_up problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    pub tokens: usize,
    pub hidden: usize,
    /// Expert intermediate size: outputs of gate and of up.
    pub inter: usize,
    pub experts: usize,
    pub topk: usize,
}

impl MoeShape {
    /// Routed (token, slot) pairs: rows of the output.
    pub fn pairs(&self) -> usize {
        self.tokens * self.topk
    }

    /// Packed bytes of one expert's gate (or up) matrix: [inter/4, hidden].
    pub fn expert_bytes(&self) -> usize {
        self.inter / 4 * self.hidden
    }
}

/// One stacked projection of all experts: packed [E, inter/4, hidden] and a scale per expert.
#[derive(Debug, Clone, Copy)]
pub struct TernaryExperts<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [f32],
}

/// `z * sigmoid(z)`.
pub fn silu(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

/// The expert activation of the gate: SiLU or ReLU² (`moe_gateup`'s ACT = 1 / 0).
pub fn expert_act(silu_act: bool, z: f64) -> f64 {
    if silu_act { silu(z) } else { super::decode_ops::relu2(z) }
}

/// act [pairs, inter]: row `p = t * topk + slot` is `act(s_g Wg_e x_t) * (s_u Wu_e x_t)` for
/// the expert `e = topk_ids[p]` (act SiLU with `silu_act`, else ReLU²); `x` is [tokens, hidden].
pub fn moe_gateup(shape: &MoeShape, x: &[f64], gate: TernaryExperts, up: TernaryExperts, topk_ids: &[i32], silu_act: bool) -> Vec<f64> {
    let MoeShape { hidden: h, inter: n, experts, .. } = *shape;
    assert_eq!(x.len(), shape.tokens * h, "x must be tokens*hidden");
    assert_eq!(topk_ids.len(), shape.pairs(), "topk_ids must be tokens*topk");
    for w in [gate, up] {
        assert_eq!(w.packed.len(), experts * shape.expert_bytes(), "packed experts must be E*inter/4*hidden");
        assert_eq!(w.scales.len(), experts, "one scale per expert");
    }
    let bytes = shape.expert_bytes();
    // Per expert: gather its pairs' token rows, run both projections over them at once.
    let per_expert: Vec<(Vec<usize>, Vec<f64>)> = (0..experts)
        .into_par_iter()
        .map(|e| {
            let pairs: Vec<usize> = (0..topk_ids.len()).filter(|&p| topk_ids[p] == e as i32).collect();
            if pairs.is_empty() {
                return (pairs, Vec::new());
            }
            let xg: Vec<f64> = pairs.iter().flat_map(|&p| &x[p / shape.topk * h..][..h]).copied().collect();
            let proj = |w: TernaryExperts| {
                ternary_linear(&w.packed[e * bytes..][..bytes], n, h, &xg, pairs.len(), w.scales[e] as f64)
            };
            let (g, u) = (proj(gate), proj(up));
            (pairs, g.iter().zip(&u).map(|(&g, &u)| expert_act(silu_act, g) * u).collect())
        })
        .collect();
    scatter_pairs(per_expert, shape.pairs(), n, experts)
}

/// Rows of every pair from per-expert (pairs, rows) groups, [pairs, width].
fn scatter_pairs(per_expert: Vec<(Vec<usize>, Vec<f64>)>, pairs: usize, width: usize, experts: usize) -> Vec<f64> {
    let mut out = vec![f64::NAN; pairs * width];
    for (ps, rows) in per_expert {
        for (i, p) in ps.into_iter().enumerate() {
            out[p * width..][..width].copy_from_slice(&rows[i * width..][..width]);
        }
    }
    assert!(out.iter().all(|v| !v.is_nan()), "every pair routes to an expert in 0..{experts}");
    out
}

/// out [pairs, hidden]: row `p` is `s_d Wd_e a_p` for the expert `e = topk_ids[p]`, with `a`
/// [pairs, inter] (each pair's gate_up output) and down experts packed [E, hidden/4, inter].
pub fn moe_down(shape: &MoeShape, a: &[f64], down: TernaryExperts, topk_ids: &[i32]) -> Vec<f64> {
    let MoeShape { hidden: h, inter: n, experts, .. } = *shape;
    assert_eq!(a.len(), shape.pairs() * n, "a must be pairs*inter");
    assert_eq!(topk_ids.len(), shape.pairs(), "topk_ids must be tokens*topk");
    let bytes = h / 4 * n;
    assert_eq!(down.packed.len(), experts * bytes, "packed experts must be E*hidden/4*inter");
    assert_eq!(down.scales.len(), experts, "one scale per expert");
    let per_expert: Vec<(Vec<usize>, Vec<f64>)> = (0..experts)
        .into_par_iter()
        .map(|e| {
            let pairs: Vec<usize> = (0..topk_ids.len()).filter(|&p| topk_ids[p] == e as i32).collect();
            if pairs.is_empty() {
                return (pairs, Vec::new());
            }
            let ag: Vec<f64> = pairs.iter().flat_map(|&p| &a[p * n..][..n]).copied().collect();
            let rows = ternary_linear(&down.packed[e * bytes..][..bytes], h, n, &ag, pairs.len(), down.scales[e] as f64);
            (pairs, rows)
        })
        .collect();
    scatter_pairs(per_expert, shape.pairs(), h, experts)
}

/// Softmax top-k routing: the chosen experts of one token and their weights.
pub fn route(logits: &[f64], topk: usize, renormalize: bool) -> Vec<(usize, f64)> {
    let mut p = logits.to_vec();
    crate::reference::decode_ops::softmax_in_place(&mut p);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    // Highest probability first; ties go to the lower expert id.
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let chosen: Vec<(usize, f64)> = idx[..topk].iter().map(|&e| (e, p[e])).collect();
    let sum: f64 = chosen.iter().map(|(_, w)| w).sum();
    if renormalize {
        chosen.into_iter().map(|(e, w)| (e, w / sum)).collect()
    } else {
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::pack_ternary;

    #[test]
    fn matches_dense_computation() {
        let shape = MoeShape { tokens: 3, hidden: 5, inter: 8, experts: 3, topk: 2 };
        let (h, n) = (shape.hidden, shape.inter);
        let w = |seed: usize| -> Vec<i8> {
            (0..shape.experts * n * h).map(|i| ((i * 7 + seed * 3 + i / 5) % 3) as i8 - 1).collect()
        };
        let (wg, wu) = (w(1), w(2));
        let pack = |w: &[i8]| -> Vec<u8> { w.chunks(n * h).flat_map(|we| pack_ternary(we, n, h)).collect() };
        let (pg, pu) = (pack(&wg), pack(&wu));
        let (sg, su) = ([0.5f32, 1.0, 1.25], [1.5f32, 0.75, 1.0]);
        let x: Vec<f64> = (0..shape.tokens * h).map(|i| i as f64 * 0.3 - 2.0).collect();
        let ids = [2, 0, 1, 2, 0, 1];
        let act = moe_gateup(
            &shape,
            &x,
            TernaryExperts { packed: &pg, scales: &sg },
            TernaryExperts { packed: &pu, scales: &su },
            &ids,
            true,
        );
        for (p, &e) in ids.iter().enumerate() {
            let (e, t) = (e as usize, p / shape.topk);
            for r in 0..n {
                let dot = |w: &[i8]| -> f64 { (0..h).map(|c| w[(e * n + r) * h + c] as f64 * x[t * h + c]).sum() };
                let g = sg[e] as f64 * dot(&wg);
                let u = su[e] as f64 * dot(&wu);
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((act[p * n + r] - want).abs() < 1e-12, "pair {p} row {r}: {} vs {want}", act[p * n + r]);
            }
        }
    }

    #[test]
    fn down_matches_dense_computation() {
        let shape = MoeShape { tokens: 2, hidden: 8, inter: 5, experts: 3, topk: 2 };
        let (h, n) = (shape.hidden, shape.inter);
        let w: Vec<i8> = (0..shape.experts * h * n).map(|i| ((i * 5 + i / 3) % 3) as i8 - 1).collect();
        let packed: Vec<u8> = w.chunks(h * n).flat_map(|we| pack_ternary(we, h, n)).collect();
        let scales = [0.5f32, 2.0, 1.5];
        let a: Vec<f64> = (0..shape.pairs() * n).map(|i| i as f64 * 0.25 - 1.0).collect();
        let ids = [1, 2, 0, 1];
        let out = moe_down(&shape, &a, TernaryExperts { packed: &packed, scales: &scales }, &ids);
        for (p, &e) in ids.iter().enumerate() {
            let e = e as usize;
            for r in 0..h {
                let want = scales[e] as f64 * (0..n).map(|c| w[(e * h + r) * n + c] as f64 * a[p * n + c]).sum::<f64>();
                assert!((out[p * h + r] - want).abs() < 1e-12, "pair {p} row {r}");
            }
        }
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
        assert!(silu(-800.0).abs() < 1e-300);
    }
}
