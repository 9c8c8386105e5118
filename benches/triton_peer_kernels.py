"""Triton kernels of benches/triton_peer.py (imported by its main, so --help needs no triton).

Layouts are mangrove's (kernel_templates/ternary_gemv.toml, moe_gateup.toml): packed ternary
weights uint8 [rows/4, cols]; byte (j, c) holds rows j + s*rows/4 (s = 0..3) in bits 2s..2s+1,
stored as w+1. The raw kernels are module-level @triton.jit functions; `autotuned(space, sms)`
wraps them in @triton.autotune with the config space the script asked for.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _plane(w, s: tl.constexpr):
    """The ternary values (-1, 0, 1) of bit plane s of packed bytes, as f32."""
    return ((w >> (2 * s)) & 3).to(tl.float32) - 1.0


@triton.jit
def _gemv_store(y_ptr, acc, scale, offs_m, mask_m, rows, mask_j, N):
    ptrs = y_ptr + offs_m[None, :] * N + rows[:, None]
    tl.store(ptrs, (acc * scale).to(tl.bfloat16), mask=mask_j[:, None] & mask_m[None, :])


@triton.jit
def _gemv_reduce(ws_ptr, y_ptr, scale, offs_m, mask_m, rows, mask_j, M, N,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """Sums the f32 partials of output rows `rows` over splits 0..SPLIT_K-1, in order."""
    total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for s in tl.static_range(SPLIT_K):
        ptrs = ws_ptr + s * M * N + offs_m[None, :] * N + rows[:, None]
        total += tl.load(ptrs, mask=mask_j[:, None] & mask_m[None, :], other=0.0, cache_modifier=".cg")
    _gemv_store(y_ptr, total, scale, offs_m, mask_m, rows, mask_j, N)


@triton.jit
def ternary_gemv_kernel(w_ptr, x_ptr, y_ptr, ws_ptr, cnt_ptr, scale, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[m, n] = scale * sum_k w[n, k] x[m, k] (bf16 x and y, f32 accumulation). This program:
    BLOCK_N packed rows (4*BLOCK_N outputs) over split program_id(1) of K, for all M rows
    (BLOCK_M == 1: row reductions; else tl.dot with M padded to BLOCK_M = 16). With SPLIT_K > 1
    every split writes f32 partials and the last program of the tile to arrive sums them in
    split order (deterministic, like mangrove's kernel) and resets the tile's counter."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n4 = N // 4
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = offs_j < n4
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    acc0 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for kk in range(0, k_split, BLOCK_K):
        offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_j[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_j[:, None] & mask_k[None, :], other=0)
        if BLOCK_M == 1:
            xr = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            acc0 += tl.sum(_plane(w, 0) * xr, axis=1)[:, None]
            acc1 += tl.sum(_plane(w, 1) * xr, axis=1)[:, None]
            acc2 += tl.sum(_plane(w, 2) * xr, axis=1)[:, None]
            acc3 += tl.sum(_plane(w, 3) * xr, axis=1)[:, None]
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=mask_m[None, :] & mask_k[:, None], other=0.0)
            acc0 = tl.dot(_plane(w, 0).to(tl.bfloat16), xt, acc0)
            acc1 = tl.dot(_plane(w, 1).to(tl.bfloat16), xt, acc1)
            acc2 = tl.dot(_plane(w, 2).to(tl.bfloat16), xt, acc2)
            acc3 = tl.dot(_plane(w, 3).to(tl.bfloat16), xt, acc3)
    if SPLIT_K == 1:
        _gemv_store(y_ptr, acc0, scale, offs_m, mask_m, offs_j, mask_j, N)
        _gemv_store(y_ptr, acc1, scale, offs_m, mask_m, offs_j + n4, mask_j, N)
        _gemv_store(y_ptr, acc2, scale, offs_m, mask_m, offs_j + 2 * n4, mask_j, N)
        _gemv_store(y_ptr, acc3, scale, offs_m, mask_m, offs_j + 3 * n4, mask_j, N)
    else:
        part = ws_ptr + pid_k * M * N + offs_m[None, :] * N
        pm = mask_j[:, None] & mask_m[None, :]
        tl.store(part + offs_j[:, None], acc0, mask=pm)
        tl.store(part + (offs_j + n4)[:, None], acc1, mask=pm)
        tl.store(part + (offs_j + 2 * n4)[:, None], acc2, mask=pm)
        tl.store(part + (offs_j + 3 * n4)[:, None], acc3, mask=pm)
        tl.debug_barrier()  # every thread's partials are issued before the release below
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            _gemv_reduce(ws_ptr, y_ptr, scale, offs_m, mask_m, offs_j, mask_j, M, N, BLOCK_N, BLOCK_M, SPLIT_K)
            _gemv_reduce(ws_ptr, y_ptr, scale, offs_m, mask_m, offs_j + n4, mask_j, M, N, BLOCK_N, BLOCK_M, SPLIT_K)
            _gemv_reduce(ws_ptr, y_ptr, scale, offs_m, mask_m, offs_j + 2 * n4, mask_j, M, N, BLOCK_N, BLOCK_M, SPLIT_K)
            _gemv_reduce(ws_ptr, y_ptr, scale, offs_m, mask_m, offs_j + 3 * n4, mask_j, M, N, BLOCK_N, BLOCK_M, SPLIT_K)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _moe_store(act_ptr, row, cols, mask, g, u):
    a = g * tl.sigmoid(g) * u
    tl.store(act_ptr + row + cols[None, :], a.to(tl.bfloat16), mask=mask)


@triton.jit
def moe_gateup_kernel(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, ids_ptr, blk_ptr, act_ptr, num_pairs, num_m, H, I, TOPK,
                      BLOCK_M: tl.constexpr, BLOCK_N4: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """act[p, n] = silu(s_g[e] (Wg_e x_t)[n]) * (s_u[e] (Wu_e x_t)[n]) for routed pair p = t*TOPK +
    slot of expert e. This program: BLOCK_M routed rows of one expert (ids_ptr: sorted pair ids
    padded with the sentinel num_pairs, blk_ptr: expert of each row block) x BLOCK_N4 packed rows
    (4*BLOCK_N4 outputs of gate and of up), tiles in grouped order. H % BLOCK_K == 0."""
    pid = tl.program_id(0)
    i4 = I // 4
    num_n = tl.cdiv(i4, BLOCK_N4)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group
    pid_n = (pid % in_group) // group
    e = tl.load(blk_ptr + pid_m).to(tl.int64)
    ids = tl.load(ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < num_pairs
    tok = tl.where(valid, ids // TOPK, 0).to(tl.int64)
    offs_j = pid_n * BLOCK_N4 + tl.arange(0, BLOCK_N4)
    mask_j = offs_j < i4
    base = e * i4 * H
    g0 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    g1 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    g2 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    g3 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    u0 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    u1 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    u2 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    u3 = tl.zeros((BLOCK_M, BLOCK_N4), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + tok[:, None] * H + offs_k[None, :], mask=valid[:, None], other=0.0)
        woff = base + offs_j[None, :] * H + offs_k[:, None]
        wg = tl.load(wg_ptr + woff, mask=mask_j[None, :], other=0)
        wu = tl.load(wu_ptr + woff, mask=mask_j[None, :], other=0)
        g0 = tl.dot(xt, _plane(wg, 0).to(tl.bfloat16), g0)
        g1 = tl.dot(xt, _plane(wg, 1).to(tl.bfloat16), g1)
        g2 = tl.dot(xt, _plane(wg, 2).to(tl.bfloat16), g2)
        g3 = tl.dot(xt, _plane(wg, 3).to(tl.bfloat16), g3)
        u0 = tl.dot(xt, _plane(wu, 0).to(tl.bfloat16), u0)
        u1 = tl.dot(xt, _plane(wu, 1).to(tl.bfloat16), u1)
        u2 = tl.dot(xt, _plane(wu, 2).to(tl.bfloat16), u2)
        u3 = tl.dot(xt, _plane(wu, 3).to(tl.bfloat16), u3)
    sg = tl.load(sg_ptr + e)
    su = tl.load(su_ptr + e)
    row = ids.to(tl.int64)[:, None] * I
    mask = valid[:, None] & mask_j[None, :]
    _moe_store(act_ptr, row, offs_j, mask, g0 * sg, u0 * su)
    _moe_store(act_ptr, row, offs_j + i4, mask, g1 * sg, u1 * su)
    _moe_store(act_ptr, row, offs_j + 2 * i4, mask, g2 * sg, u2 * su)
    _moe_store(act_ptr, row, offs_j + 3 * i4, mask, g3 * sg, u3 * su)


def gemv_configs(space):
    """BLOCK_N (packed rows: 4x outputs) x BLOCK_K x num_warps x num_stages x SPLIT_K; mangrove's
    ternary_gemv sweeps THREADS x ROWS_PER_WARP x VEC x SPLIT_K x UNROLL (432 points)."""
    if space == "full":
        grid = [(bn, bk, w, st, sk) for bn in (4, 8, 16, 32, 64) for bk in (64, 128, 256, 512) for w in (2, 4, 8)
                for st in (2, 3, 4) for sk in (1, 2, 4, 8)]
    else:
        grid = [(bn, bk, w, 3, sk) for bn in (8, 16, 32) for bk in (128, 256) for w in (4, 8) for sk in (1, 2, 4, 8)]
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w, num_stages=st) for bn, bk, w, st, sk in grid]


def moe_configs(space):
    """BLOCK_N4 x BLOCK_K x num_warps x num_stages x GROUP_M per BLOCK_M (the routing's row block,
    chosen outside the autotuner because the routing depends on it), as mangrove's moe_gateup."""
    if space == "full":
        grid = [(bn4, bk, w, st, g) for bn4 in (16, 32) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)
                for g in (1, 4, 8)]
    else:
        grid = [(bn4, bk, 4, st, g) for bn4 in (16, 32) for bk in (64, 128) for st in (2, 3) for g in (1, 8)]
    return [triton.Config(dict(BLOCK_N4=bn4, BLOCK_K=bk, GROUP_M=g), num_warps=w, num_stages=st) for bn4, bk, w, st, g in grid]


def autotuned(space, sms):
    """(gemv, moe) kernels wrapped in @triton.autotune over `space`; GEMV configs whose grid
    would leave most SMs idle or is absurdly large, or whose split is shorter than one BLOCK_K,
    are pruned before benchmarking (tl.dot needs BLOCK_N >= 16 when M > 1)."""

    def gemv_prune(configs, named_args, **kwargs):
        n4, k, m = named_args["N"] // 4, named_args["K"], named_args["M"]
        keep = []
        for c in configs:
            bn, bk, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
            ctas = triton.cdiv(n4, bn) * sk
            if m > 1 and bn < 16:
                continue
            if triton.cdiv(k, sk) < bk or ctas < sms // 2 or ctas > 16 * sms:
                continue
            keep.append(c)
        return keep or [c for c in configs if m == 1 or c.kwargs["BLOCK_N"] >= 16][:1]

    gemv = triton.autotune(configs=gemv_configs(space), key=["M", "N", "K"],
                           prune_configs_by={"early_config_prune": gemv_prune})(ternary_gemv_kernel)
    moe = triton.autotune(configs=moe_configs(space), key=["num_m", "I", "H", "BLOCK_M"])(moe_gateup_kernel)
    return gemv, moe


def best_config(kernel):
    """The autotuner's choice for the last key it ran, as a dict (None before any run)."""
    c = getattr(kernel, "best_config", None)
    return None if c is None else dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


class TritonGemv:
    """Launcher of the autotuned ternary GEMV for one (M, N, K), with its split-K workspace:
    f32 partials for up to 8 splits and one arrival counter per tile (self-resetting)."""

    def __init__(self, kernel, m, n, k, device):
        self.kernel, self.m, self.n, self.k = kernel, m, n, k
        self.block_m = 1 if m == 1 else 16
        self.ws = torch.empty(8 * m * n, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(triton.cdiv(n // 4, 4), dtype=torch.int32, device=device)

    def __call__(self, w, x, y, scale):
        n4 = self.n // 4
        grid = lambda meta: (triton.cdiv(n4, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        self.kernel[grid](w, x, y, self.ws, self.cnt, scale, self.m, self.n, self.k, BLOCK_M=self.block_m)


def launch_moe(kernel, x, wg, wu, sg, su, ids, blocks, act, num_pairs, num_m, h, inter, topk, block_m):
    """One moe_gateup launch over num_m row blocks of a routing aligned to block_m."""
    grid = lambda meta: (num_m * triton.cdiv(inter // 4, meta["BLOCK_N4"]),)  # noqa: E731
    kernel[grid](x, wg, wu, sg, su, ids, blocks, act, num_pairs, num_m, h, inter, topk, BLOCK_M=block_m)
