//! f64 reference of the MoE gate_up stage with ternary experts: for every routed
//! (token, slot) pair, `silu(gate) * up` of its expert, each a [`ternary_linear`] of the token.

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

/// act [pairs, inter]: row `p = t * topk + slot` is `silu(s_g Wg_e x_t) * (s_u Wu_e x_t)` for
/// the expert `e = topk_ids[p]`; `x` is [tokens, hidden].
pub fn moe_gateup(shape: &MoeShape, x: &[f64], gate: TernaryExperts, up: TernaryExperts, topk_ids: &[i32]) -> Vec<f64> {
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
            (pairs, g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect())
        })
        .collect();
    let mut act = vec![f64::NAN; shape.pairs() * n];
    for (pairs, rows) in per_expert {
        for (i, p) in pairs.into_iter().enumerate() {
            act[p * n..][..n].copy_from_slice(&rows[i * n..][..n]);
        }
    }
    assert!(act.iter().all(|v| !v.is_nan()), "every pair routes to an expert in 0..{experts}");
    act
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
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
        assert!(silu(-800.0).abs() < 1e-300);
    }
}
