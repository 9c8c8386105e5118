//! [`SimdCpuBackend`]: the fast CPU backend (`--backend cpu`). Built once from a loaded
//! [`Model`]: every ternary linear repacked into row quads (q|k|v and gate|up concatenated, one
//! dispatch each), norms in f32, the LM head (and embeddings) kept in bf16 when the checkpoint
//! is bf16. A step runs on the fixed pool: embedding gather, then per layer RMSNorm + int8
//! quantization, the ternary × int8 linears (exact int32 sums), RoPE, the K/V append into each
//! sequence's f32 cache (reserved in blocks of [`KV_BLOCK`] positions, never per token), causal
//! GQA attention per (row, head), the gated MLP (or the MoE experts), and the f32 LM head over
//! each sequence's last row. All step buffers live in one [`Workspace`] that only grows, so a
//! steady decode step allocates nothing but the logits it returns. The numerics follow the f64
//! reference backend ([`crate::cpu`]) in f32, which the tests hold it to.

use std::sync::Mutex;

use rayon::prelude::*;

use mangrove_core::model_config::ModelConfig;
use mangrove_core::reference::moe::route;

use super::kernels::{Dense, Kernels};
use super::ops::{self, attend, gate, norm_quant, quantize, rope, rope_table};
use super::pool::{dense_linear, ternary_linear, Pool, QuantRows, Split};
use super::repack::{padded, PackedTernary};
use super::tune::CpuTunables;
use crate::backend::{check_batch, Backend, ForwardError, KvCache, SeqInput, StepReport};
use crate::model::{Ffn, Model};

/// Positions a sequence's f32 KV cache grows by at a time.
pub const KV_BLOCK: usize = 256;

/// Errors of building the backend.
#[derive(Debug, thiserror::Error)]
pub enum SimdError {
    #[error("cpu backend: {0}")]
    Tunables(String),
    #[error("cpu backend: building the thread pool")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

struct Expert {
    gate_up: PackedTernary,
    down: PackedTernary,
}

enum FfnW {
    Dense { gate_up: PackedTernary, down: PackedTernary, sub_norm: Vec<f32> },
    Moe { router: Vec<f32>, experts: Vec<Expert> },
}

struct LayerW {
    input_norm: Vec<f32>,
    qkv: PackedTernary,
    o: PackedTernary,
    attn_sub_norm: Vec<f32>,
    post_norm: Vec<f32>,
    ffn: FfnW,
}

/// Step buffers, sized for the largest step seen so far.
#[derive(Default)]
struct Workspace {
    rows: Vec<(usize, usize)>,
    tokens: Vec<u32>,
    x: Vec<f32>,
    tmp: Vec<f32>,
    xq: Vec<i8>,
    inv_s: Vec<f32>,
    xsum: Vec<i32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    lin: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    cs: Vec<f32>,
    scores: Vec<f32>,
    last: Vec<usize>,
    fin: Vec<f32>,
    logits: Vec<f32>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// The SIMD CPU backend over a model repacked at construction.
pub struct SimdCpuBackend {
    config: ModelConfig,
    layers: Vec<LayerW>,
    /// Embeddings when not tied to the LM head.
    embed: Option<Dense>,
    lm_head: Dense,
    norm: Vec<f32>,
    inv_freq: Vec<f64>,
    /// The kernels and work split per step size: entry m − 1 for m rows (the last for larger
    /// steps).
    splits: Vec<(Kernels, Split)>,
    tunables: CpuTunables,
    pool: Pool,
    work: Mutex<Workspace>,
}

impl std::fmt::Debug for SimdCpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimdCpuBackend").field("tunables", &self.tunables).field("pool", &self.pool).finish()
    }
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl SimdCpuBackend {
    /// Repacks `model` for the kernels of `tunables`, with the tuned kernels and split of each
    /// step size (rows m = 1.. → entry m − 1) from `mangrove-tune cpu`'s records
    /// ([`super::sweep::tunables_from_db`]); the pool has the threads of `tunables`.
    pub fn with_splits(model: &Model, tunables: CpuTunables, per_m: &[CpuTunables]) -> Result<Self, SimdError> {
        let mut b = Self::new(model, tunables)?;
        if !per_m.is_empty() {
            b.splits = per_m.iter().map(|t| Ok((t.kernels()?, t.split()))).collect::<Result<_, String>>().map_err(SimdError::Tunables)?;
        }
        Ok(b)
    }

    /// The kernels and work split of a step of `m` rows.
    fn split_for(&self, m: usize) -> (&Kernels, &Split) {
        let (k, s) = &self.splits[m.clamp(1, self.splits.len()) - 1];
        (k, s)
    }

    /// Repacks `model` for the kernels of `tunables`.
    pub fn new(model: &Model, tunables: CpuTunables) -> Result<Self, SimdError> {
        let kernels = tunables.kernels().map_err(SimdError::Tunables)?;
        let c = &model.config;
        let conv = c.scale;
        let layers = model
            .layers
            .par_iter()
            .map(|l| LayerW {
                input_norm: f32s(&l.input_norm),
                qkv: PackedTernary::concat(&[&l.q, &l.k, &l.v], conv),
                o: PackedTernary::from_linear(&l.o, conv),
                attn_sub_norm: f32s(&l.attn_sub_norm),
                post_norm: f32s(&l.post_attn_norm),
                ffn: match &l.ffn {
                    Ffn::Dense { gate, up, down, sub_norm } => FfnW::Dense {
                        gate_up: PackedTernary::concat(&[gate, up], conv),
                        down: PackedTernary::from_linear(down, conv),
                        sub_norm: f32s(sub_norm),
                    },
                    Ffn::Moe { router, experts } => FfnW::Moe {
                        router: f32s(router),
                        experts: experts
                            .iter()
                            .map(|e| Expert {
                                gate_up: PackedTernary::concat(&[&e.gate, &e.up], conv),
                                down: PackedTernary::from_linear(&e.down, conv),
                            })
                            .collect(),
                    },
                },
            })
            .collect();
        let lm_head = Dense::new(model.lm_head());
        let embed = model.lm_head.as_ref().map(|_| Dense::new(&model.embed));
        Ok(SimdCpuBackend {
            config: c.clone(),
            layers,
            embed,
            lm_head,
            norm: f32s(&model.norm),
            inv_freq: ops::inv_freq(c.rope_theta, c.head_dim),
            splits: vec![(kernels, tunables.split())],
            tunables,
            pool: Pool::new(tunables.threads)?,
            work: Mutex::new(Workspace::default()),
        })
    }

    /// The tunables it runs with.
    pub fn tunables(&self) -> CpuTunables {
        self.tunables
    }

    /// Bytes of weights one decode step streams (repacked ternary rows + LM head).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &LayerW| {
            l.qkv.bytes()
                + l.o.bytes()
                + match &l.ffn {
                    FfnW::Dense { gate_up, down, .. } => gate_up.bytes() + down.bytes(),
                    FfnW::Moe { experts, .. } => experts.iter().map(|e| e.gate_up.bytes() + e.down.bytes()).sum(),
                }
        };
        self.layers.iter().map(lin).sum::<usize>() + self.lm_head.bytes()
    }

    /// Reserves every sequence's f32 cache for its new tokens, in blocks of [`KV_BLOCK`].
    fn reserve(&self, batch: &mut [SeqInput]) -> Result<(), ForwardError> {
        let c = &self.config;
        let kvd = c.kv_dim();
        for (s, seq) in batch.iter_mut().enumerate() {
            let cache: &mut KvCache = seq.cache;
            if cache.k32.len() != c.layers {
                if cache.len > 0 {
                    return Err(ForwardError::Device(format!("sequence {s}: its KV cache was filled by another backend")));
                }
                cache.k32 = vec![Vec::new(); c.layers];
                cache.v32 = vec![Vec::new(); c.layers];
            }
            let need = cache.len + seq.tokens.len();
            let cap = need.div_ceil(KV_BLOCK).saturating_mul(KV_BLOCK).min(c.max_positions.max(need)) * kvd;
            for kv in cache.k32.iter_mut().chain(cache.v32.iter_mut()) {
                if kv.len() != cache.len * kvd {
                    return Err(ForwardError::Device(format!("sequence {s}: its KV cache was filled by another backend")));
                }
                if kv.capacity() < need * kvd {
                    kv.reserve_exact(cap - kv.len());
                }
            }
        }
        Ok(())
    }

    fn step(&self, ws: &mut Workspace, batch: &mut [SeqInput]) -> Vec<Vec<f64>> {
        let c = &self.config;
        let (h, hd, qd, kvd) = (c.hidden, c.head_dim, c.q_dim(), c.kv_dim());
        let m = ws.rows.len();
        let (k, split) = self.split_for(m);
        let eps = c.rms_eps as f32;
        let nqkv = qd + 2 * kvd;
        let group = c.heads / c.kv_heads;
        let ctx = ws.rows.iter().map(|&(_, p)| p + 1).max().unwrap_or(1);
        let Workspace { rows, tokens, x, tmp, xq, inv_s, xsum, qkv, attn, lin, gu, act, cs, scores, last, fin, logits } = ws;
        let rows = &rows[..];
        // Embedding gather and the RoPE table of each row.
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        x[..m * h].par_chunks_mut(h).zip(&tokens[..m]).for_each(|(xr, &t)| table.row_into(t as usize, h, xr));
        for (r, &(_, pos)) in rows.iter().enumerate() {
            rope_table(pos, &self.inv_freq, &mut cs[r * hd..][..hd]);
        }
        for (li, l) in self.layers.iter().enumerate() {
            // Attention block.
            let kp = quant_rows(&x[..m * h], h, Some(&l.input_norm), eps, tmp, xq, inv_s, xsum);
            debug_assert_eq!(kp, l.qkv.kp);
            ternary_linear(k, split, &l.qkv, QuantRows { q: xq, inv_s, sum: xsum }, m, &mut qkv[..m * nqkv]);
            for (r, row) in qkv[..m * nqkv].chunks_exact_mut(nqkv).enumerate() {
                let t = &cs[r * hd..][..hd];
                row[..qd + kvd].chunks_exact_mut(hd).for_each(|v| rope(v, t));
                let (s, _) = rows[r];
                let cache = &mut *batch[s].cache;
                cache.k32[li].extend_from_slice(&row[qd..qd + kvd]);
                cache.v32[li].extend_from_slice(&row[qd + kvd..]);
            }
            let seqs: &[SeqInput] = batch;
            let qkv_ro = &qkv[..m * nqkv];
            attn[..m * qd].par_chunks_mut(hd).zip(scores.par_chunks_mut(ctx)).enumerate().for_each(|(i, (out, sc))| {
                let (r, head) = (i / c.heads, i % c.heads);
                let (s, pos) = rows[r];
                let cache = &*seqs[s].cache;
                let q = &qkv_ro[r * nqkv + head * hd..][..hd];
                attend(q, pos + 1, &cache.k32[li], &cache.v32[li], kvd, (head / group) * hd, sc, out);
            });
            quant_rows(&attn[..m * qd], qd, Some(&l.attn_sub_norm), eps, tmp, xq, inv_s, xsum);
            ternary_linear(k, split, &l.o, QuantRows { q: xq, inv_s, sum: xsum }, m, &mut lin[..m * h]);
            x[..m * h].iter_mut().zip(&lin[..m * h]).for_each(|(x, o)| *x += o);
            // Feed-forward block.
            quant_rows(&x[..m * h], h, Some(&l.post_norm), eps, tmp, xq, inv_s, xsum);
            match &l.ffn {
                FfnW::Dense { gate_up, down, sub_norm } => {
                    let i2 = gate_up.n;
                    let inter = i2 / 2;
                    ternary_linear(k, split, gate_up, QuantRows { q: xq, inv_s, sum: xsum }, m, &mut gu[..m * i2]);
                    act[..m * inter].par_chunks_mut(inter).zip(gu[..m * i2].par_chunks(i2)).for_each(|(a, g)| {
                        gate(c.act, &g[..inter], &g[inter..], a);
                    });
                    quant_rows(&act[..m * inter], inter, Some(sub_norm), eps, tmp, xq, inv_s, xsum);
                    ternary_linear(k, split, down, QuantRows { q: xq, inv_s, sum: xsum }, m, &mut lin[..m * h]);
                }
                FfnW::Moe { router, experts } => self.moe(router, experts, &tmp[..m * h], &mut lin[..m * h]),
            }
            x[..m * h].iter_mut().zip(&lin[..m * h]).for_each(|(x, f)| *x += f);
        }
        for seq in batch.iter_mut() {
            seq.cache.len += seq.tokens.len();
        }
        // The LM head over each sequence's last row.
        let ns = batch.len();
        rows.iter().enumerate().for_each(|(r, &(s, _))| last[s] = r);
        for (s, &r) in last[..ns].iter().enumerate() {
            ops::rmsnorm(&x[r * h..][..h], &self.norm, eps, &mut fin[s * h..][..h]);
        }
        dense_linear(k, split, &self.lm_head, c.vocab, h, &fin[..ns * h], ns, &mut logits[..ns * c.vocab]);
        logits[..ns * c.vocab].chunks_exact(c.vocab).map(|l| l.iter().map(|&v| v as f64).collect()).collect()
    }

    /// Qwen3-MoE feed-forward of the normed rows `y` into `out` (routing on the host; allocates
    /// per step, as MoE checkpoints are small here).
    fn moe(&self, router: &[f32], experts: &[Expert], y: &[f32], out: &mut [f32]) {
        let c = &self.config;
        let h = c.hidden;
        let mc = c.moe.expect("MoE layer in an MoE config");
        let routes: Vec<Vec<(usize, f64)>> = y
            .chunks_exact(h)
            .map(|row| {
                let logits: Vec<f64> = router.chunks_exact(h).map(|w| super::kernels::scalar::dot(w, row) as f64).collect();
                route(&logits, mc.topk, mc.norm_topk_prob)
            })
            .collect();
        out.iter_mut().for_each(|o| *o = 0.0);
        for (e, ex) in experts.iter().enumerate() {
            let picks: Vec<(usize, f32)> = routes
                .iter()
                .enumerate()
                .flat_map(|(t, r)| r.iter().filter(|(re, _)| *re == e).map(move |&(_, w)| (t, w as f32)))
                .collect();
            if picks.is_empty() {
                continue;
            }
            let p = picks.len();
            let xe: Vec<f32> = picks.iter().flat_map(|&(t, _)| &y[t * h..][..h]).copied().collect();
            let (mi2, kp) = (ex.gate_up.n, ex.gate_up.kp);
            let (mut q, mut inv_s, mut sum, mut tmp) = (vec![0i8; p * kp.max(ex.down.kp)], vec![0f32; p], vec![0i32; p], vec![0f32; p * h.max(mi2 / 2)]);
            quant_rows(&xe, h, None, 0.0, &mut tmp, &mut q, &mut inv_s, &mut sum);
            let mut g = vec![0f32; p * mi2];
            let (k, split) = self.split_for(p);
            ternary_linear(k, split, &ex.gate_up, QuantRows { q: &q, inv_s: &inv_s, sum: &sum }, p, &mut g);
            let mi = mi2 / 2;
            let a: Vec<f32> = g.chunks_exact(mi2).flat_map(|r| r[..mi].iter().zip(&r[mi..]).map(|(&g, &u)| ops::silu(g) * u)).collect();
            quant_rows(&a, mi, None, 0.0, &mut tmp, &mut q, &mut inv_s, &mut sum);
            let mut d = vec![0f32; p * h];
            ternary_linear(k, split, &ex.down, QuantRows { q: &q, inv_s: &inv_s, sum: &sum }, p, &mut d);
            for (i, &(t, w)) in picks.iter().enumerate() {
                out[t * h..][..h].iter_mut().zip(&d[i * h..][..h]).for_each(|(o, d)| *o += w * d);
            }
        }
    }
}

/// Normalizes (with `norm`, if any) and quantizes each of the `m = src.len() / cols` rows of
/// `src` into `xq` (`[m][kp]`, kp = `cols` padded), `inv_s`, `sum`; the normed rows land in `tmp`.
/// Returns kp.
#[allow(clippy::too_many_arguments)]
fn quant_rows(src: &[f32], cols: usize, norm: Option<&[f32]>, eps: f32, tmp: &mut [f32], xq: &mut [i8], inv_s: &mut [f32], sum: &mut [i32]) -> usize {
    let kp = padded(cols);
    let m = src.len() / cols;
    xq[..m * kp]
        .par_chunks_mut(kp)
        .zip(tmp[..m * cols].par_chunks_mut(cols))
        .zip(inv_s[..m].par_iter_mut().zip(sum[..m].par_iter_mut()))
        .zip(src.par_chunks(cols))
        .for_each(|(((q, t), (is, s)), x)| {
            (*is, *s) = match norm {
                Some(w) => norm_quant(x, w, eps, t, q),
                None => quantize(x, q),
            };
        });
    kp
}

impl Backend for SimdCpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(&self, batch: &mut [SeqInput]) -> Result<(Vec<Vec<f64>>, StepReport), ForwardError> {
        let c = &self.config;
        check_batch(c, batch)?;
        self.reserve(batch)?;
        let mut guard = self.work.lock().unwrap_or_else(|e| e.into_inner());
        let ws = &mut *guard;
        ws.rows.clear();
        ws.tokens.clear();
        for (s, seq) in batch.iter().enumerate() {
            for (i, &t) in seq.tokens.iter().enumerate() {
                ws.rows.push((s, seq.cache.len + i));
                ws.tokens.push(t);
            }
        }
        let (m, ns) = (ws.rows.len(), batch.len());
        let ctx = ws.rows.iter().map(|&(_, p)| p + 1).max().unwrap_or(1);
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let inter = match c.moe {
            None => c.inter,
            Some(mc) => mc.inter,
        };
        let widest = h.max(qd).max(inter);
        grow(&mut ws.x, m * h);
        grow(&mut ws.tmp, m * widest);
        grow(&mut ws.xq, m * padded(widest));
        grow(&mut ws.inv_s, m);
        grow(&mut ws.xsum, m);
        grow(&mut ws.qkv, m * (qd + 2 * kvd));
        grow(&mut ws.attn, m * qd);
        grow(&mut ws.lin, m * h);
        grow(&mut ws.gu, m * 2 * inter);
        grow(&mut ws.act, m * inter);
        grow(&mut ws.cs, m * c.head_dim);
        // The scores scratch is cut in `ctx`-long pieces, one per (row, head).
        if ws.scores.len() < m * c.heads * ctx {
            ws.scores.resize(m * c.heads * ctx.max(KV_BLOCK), 0.0);
        }
        grow(&mut ws.last, ns);
        grow(&mut ws.fin, ns * h);
        grow(&mut ws.logits, ns * c.vocab);
        let logits = self.pool.install(|| self.step(ws, batch));
        let isa = self.split_for(m).0.isa();
        let paths = crate::cpu::families(c).into_iter().map(|f| (f, isa.variant())).collect();
        Ok((logits, StepReport { paths, fallbacks: Vec::new() }))
    }
}
