#!/usr/bin/env python3
"""Torch bf16 peer of `mangrove bench decode`: a bitnet-2b-shaped decoder, one decode step per CUDA graph replay.

The model has the shapes of mangrove's `bitnet-2b` preset (engine/genmodel.rs: hidden 2560,
intermediate 6912, 30 layers, 20 heads, 5 KV heads, head_dim 128, vocab 128256, tied
embeddings, RoPE theta 500000, RMSNorm eps 1e-5) and BitNet's layer structure:

    h   = x + o_proj(attn_sub_norm(attn(rope(qkv_proj(input_layernorm(x))))))
    out = h + down_proj(ffn_sub_norm(relu(gate)^2 * up)),  gate|up = gate_up_proj(post_attention_layernorm(h))

with every linear a dense bf16 matrix (q|k|v and gate|up fused into one matmul each, as
mangrove fuses them), random weights (never zeros), a static bf16 KV cache per batch size
([layers, batch, kv_heads, positions, head_dim]) and greedy argmax feeding the next step's
tokens. For each (batch, context) row the decode step of a token at position `context` (it
attends over context + 1 positions; the cached ones are random) is captured once as a
torch.cuda.CUDAGraph and replayed; each replay is timed with CUDA events and the median is the
TPOT. The graph's eager twin is checked against a replay once per batch size, and so is the
other --ops variant (fused: F.rms_norm, one fused kernel per norm, and one RoPE pass over all q|k
heads; naive: both composed of elementwise torch ops, about 2.5x the launches per step).

Reported per row: TPOT median / p99 (ms, GPU time of one replay: no host sampling or logits
copy, which mangrove's wall-clock TPOT includes, so the comparison favours torch slightly),
tokens/s = batch / TPOT, weight bytes per step (every bf16 matrix once, the tied LM head
included; the embedding gather and the norms' vectors are not counted), KV-cache bytes read per
step, and the fraction of the measured copy bandwidth that weight_bytes / TPOT is (also with the
KV bytes). Copy bandwidth: a 1 GiB device-to-device copy in the same process, bytes read +
written (as mangrove's `copy_bandwidth_gbs` counts it), median of 10.

Usage (on the GPU machine; python3 with torch):

    python3 benches/torch_decode_peer.py [--batch 1,2,4,8,16,64] [--context 32,512,2048]
        [--samples 100] [--ops fused|naive] [--json OUT] [--mangrove-json [LABEL=]F ...] [--config config.json]
    python3 benches/torch_decode_peer.py --torch-json OUT --mangrove-json [LABEL=]F ...   # re-tabulate, no GPU

`--mangrove-json` takes the `--json` output of `mangrove bench decode` (repeat it for several
runs, e.g. one per prompt length or tuning DB; LABEL names a run, default the run's
--tuning-db) and prints one combined table: the rows whose (batch, prompt_tokens) match a
(batch, context) row here, mangrove's TPOT p50, tokens/s and fraction of its bound, and the
ratio mangrove / torch tokens/s. `--config` reads the shapes from a Hugging Face config.json
(e.g. the one `mangrove gen-model` writes) instead of the preset's.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

# engine/genmodel.rs, Preset::Bitnet2b
BITNET_2B = dict(hidden=2560, inter=6912, layers=30, heads=20, kv_heads=5, vocab=128256,
                 eps=1e-5, rope_theta=500000.0, tied=True)


def parse_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=parse_list, default=[1, 2, 4, 8, 16, 64], help="batch sizes (comma list)")
    p.add_argument("--context", type=parse_list, default=[32, 512, 2048], help="cached positions per row (comma list)")
    p.add_argument("--samples", type=int, default=100, help="timed replays per row (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed replays per row")
    p.add_argument("--json", dest="json_out", help="write this script's results as JSON here")
    p.add_argument("--mangrove-json", action="append", default=[], metavar="[LABEL=]F",
                   help="`mangrove bench decode --json` output to compare with (repeatable)")
    p.add_argument("--torch-json", help="reuse the results of an earlier --json run instead of running torch (no GPU needed)")
    p.add_argument("--config", help="Hugging Face config.json to take the shapes from (default: bitnet-2b preset)")
    p.add_argument("--ops", choices=["fused", "naive"], default="fused",
                   help="fused: F.rms_norm and one RoPE pass over q|k; naive: both composed of elementwise ops")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.samples < 1 or a.warmup < 0:
        p.error("--samples must be >= 1 and --warmup >= 0")
    if not a.batch or not a.context or min(a.batch) < 1 or min(a.context) < 0:
        p.error("--batch and --context need positive values")
    return a


def load_config(path):
    if path is None:
        return dict(BITNET_2B)
    with open(path) as f:
        c = json.load(f)
    if c.get("hidden_act", "relu2") != "relu2":
        sys.exit(f"error: {path}: hidden_act {c.get('hidden_act')!r}; this peer models BitNet's relu2")
    if c.get("num_experts"):
        sys.exit(f"error: {path}: MoE configs are not modelled")
    return dict(hidden=c["hidden_size"], inter=c["intermediate_size"], layers=c["num_hidden_layers"],
                heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                vocab=c["vocab_size"], eps=c.get("rms_norm_eps", 1e-5), rope_theta=c.get("rope_theta", 10000.0),
                tied=c.get("tie_word_embeddings", False), head_dim=c.get("head_dim"))


# ----------------------------------------------------------------------------- mangrove side

def load_mangrove(specs):
    """[(label, {(batch, prompt_tokens): run})] from `mangrove bench decode --json` files."""
    out = []
    for spec in specs:
        label, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        with open(path) as f:
            rep = json.load(f)
        if label is None:
            cmd = (rep.get("provenance") or {}).get("command", "")
            toks = cmd.split()
            label = toks[toks.index("--tuning-db") + 1] if "--tuning-db" in toks[:-1] else os.path.basename(path)
        runs = {(r["batch"], r["prompt_tokens"]): r for r in rep.get("runs", [])}
        for lab, rs in out:
            if lab == label:  # same label, e.g. one file per prompt length: merge
                rs.update(runs)
                break
        else:
            out.append((label, runs))
    return out


def fmt(v, spec="{:.3f}"):
    return "-" if v is None else spec.format(v)


def print_table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("  ".join(str(h).rjust(w[i]) for i, h in enumerate(headers)))
    for r in rows:
        print("  ".join(str(c).rjust(w[i]) for i, c in enumerate(r)))


def combined_table(results, mangrove):
    by_key = {(r["batch"], r["context"]): r for r in results["rows"] if "error" not in r}
    keys = sorted({k for _, runs in mangrove for k in runs})
    headers = ["batch", "ctx", "torch_tpot_ms", "torch_tok/s", "torch_frac"]
    for label, _ in mangrove:
        headers += [f"{label}:tpot_ms", f"{label}:tok/s", f"{label}:frac", f"{label}:ratio"]
    rows = []
    for k in keys:
        t = by_key.get(k)
        row = [k[0], k[1], fmt(t and t["tpot_ms"]), fmt(t and t["tokens_per_s"], "{:.0f}"), fmt(t and t["frac_copy_bw"], "{:.2f}")]
        for _, runs in mangrove:
            m = runs.get(k)
            ratio = m["tokens_per_s"] / t["tokens_per_s"] if m and t else None
            row += [fmt(m and m["tpot_p50_ms"]), fmt(m and m["tokens_per_s"], "{:.0f}"),
                    fmt(m and m.get("fraction_of_bound"), "{:.2f}"), fmt(ratio, "{:.2f}x")]
        rows.append(row)
    print("\nmangrove (bench decode, wall-clock TPOT p50, fraction of its 2-bit weight bound) vs torch bf16 "
          "(graph replay TPOT median, fraction of copy bandwidth); ratio = mangrove tokens/s / torch tokens/s")
    if not rows:
        print("(no mangrove rows)")
        return
    print_table(headers, rows)
    missing = [k for k in keys if k not in by_key]
    if missing:
        print(f"(no torch row for {missing}: run with matching --batch/--context)")


# ----------------------------------------------------------------------------- torch side

def run_torch(args, cfg):
    import torch
    import torch.nn.functional as F

    import peer_common

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to torch")
    dev = torch.device("cuda")
    torch.manual_seed(args.seed)
    bf16 = torch.bfloat16
    H, I, L, V = cfg["hidden"], cfg["inter"], cfg["layers"], cfg["vocab"]
    nh, nkv = cfg["heads"], cfg["kv_heads"]
    hd = cfg.get("head_dim") or H // nh
    qd, kvd, group = nh * hd, nkv * hd, nh // nkv
    eps = cfg["eps"]
    naive = args.ops == "naive"

    def copy_bandwidth_gbs():
        return peer_common.copy_bandwidth_gbs(dev)

    def lin(n, k):
        # Uniform(-a, a) with a = sqrt(3/k): unit-variance outputs for unit-variance inputs.
        return ((torch.rand(n, k, device=dev, dtype=torch.float32) * 2 - 1) * math.sqrt(3.0 / k)).to(bf16)

    def norm_w(n):
        return (1.0 + (torch.rand(n, device=dev) * 0.2 - 0.1)).to(bf16)

    copy_gbs = copy_bandwidth_gbs()
    t0 = time.time()
    layers = []
    for _ in range(L):
        layers.append(dict(w_in=norm_w(H), qkv=lin(qd + 2 * kvd, H), sub_attn=norm_w(qd), o=lin(H, qd),
                           w_post=norm_w(H), gate_up=lin(2 * I, H), sub_ffn=norm_w(I), down=lin(H, I)))
    embed = ((torch.rand(V, H, device=dev) * 0.2 - 0.1)).to(bf16)
    lm_head = embed if cfg["tied"] else lin(V, H)
    final_norm = norm_w(H)
    torch.cuda.synchronize()
    init_s = time.time() - t0
    mats = ["qkv", "o", "gate_up", "down"]
    weight_bytes = sum(layers[0][m].numel() for m in mats) * 2 * L + lm_head.numel() * 2
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))

    def rmsnorm(x, w, naive):
        if naive:  # seven elementwise/reduction kernels
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(bf16) * w
        return F.rms_norm(x, (x.shape[-1],), w, eps)  # one fused CUDA kernel

    def rope(t, cos, sin):
        # rotate_half convention: pairs (i, i + hd/2); cos, sin: [hd/2]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def make_step(B, ctx, tokens, kcache, vcache, naive):
        """One decode step at position ctx for B sequences; returns the logits buffer."""
        ang = ctx * inv_freq
        cos, sin = ang.cos().to(bf16), ang.sin().to(bf16)  # [hd/2]: pair i uses inv_freq_i
        cos_f, sin_f = torch.cat([cos, cos]), torch.cat([sin, sin])  # [hd]

        def step():
            x = F.embedding(tokens, embed)  # [B, H]
            for li, w in enumerate(layers):
                h = rmsnorm(x, w["w_in"], naive)
                qkv = F.linear(h, w["qkv"])
                v = qkv[:, qd + kvd:].view(B, nkv, 1, hd)
                if naive:
                    q = qkv[:, :qd].view(B, nkv, group, hd)  # query heads grouped by their KV head
                    k = qkv[:, qd:qd + kvd].view(B, nkv, 1, hd)
                    q, k = rope(q, cos, sin), rope(k, cos, sin)
                else:  # RoPE of all q and k heads in one pass: t·cos + rotate_half(t)·sin
                    qk = qkv[:, :qd + kvd].view(B, nh + nkv, hd)
                    qk = qk * cos_f + torch.cat([-qk[..., hd // 2:], qk[..., : hd // 2]], dim=-1) * sin_f
                    q = qk[:, :nh].view(B, nkv, group, hd)
                    k = qk[:, nh:].view(B, nkv, 1, hd)
                kcache[li, :, :, ctx:ctx + 1].copy_(k)
                vcache[li, :, :, ctx:ctx + 1].copy_(v)
                # The new token sees every cached position: no mask. The `group` query heads of a KV
                # head ride as query rows of one (B, nkv) attention problem (GQA without repeats).
                a = F.scaled_dot_product_attention(q, kcache[li, :, :, :ctx + 1], vcache[li, :, :, :ctx + 1])
                a = rmsnorm(a.reshape(B, qd), w["sub_attn"], naive)
                x = x + F.linear(a, w["o"])
                h = rmsnorm(x, w["w_post"], naive)
                g, u = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
                a = rmsnorm(torch.relu(g).square() * u, w["sub_ffn"], naive)
                x = x + F.linear(a, w["down"])
            logits = F.linear(rmsnorm(x, final_norm, naive), lm_head)
            return logits

        return step

    def measure_row(B, ctx, check_graph, tokens, kcache, vcache):
        """Captures the decode step at (B, ctx) as a graph, optionally checks it, times its replays."""
        step = make_step(B, ctx, tokens, kcache, vcache, naive)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        variant = None
        if check_graph:
            start_tokens = tokens.clone()
            eager = step().float()
            # The other --ops variant computes the same function: bf16 rounding apart, same logits.
            other = make_step(B, ctx, tokens, kcache, vcache, not naive)().float()
            variant = ((other - eager).norm() / eager.norm().clamp_min(1e-30)).item()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = step()
            tokens.copy_(logits.argmax(-1))  # greedy: the next replay decodes what this one picked
        check = None
        if check_graph:
            # The graph must compute what the eager step does (same tokens, same cache slot).
            tokens.copy_(start_tokens)
            g.replay()
            torch.cuda.synchronize()
            lf = logits.float()
            rel = ((lf - eager).norm() / eager.norm().clamp_min(1e-30)).item()
            finite = bool(torch.isfinite(lf).all().item())
            check = dict(rel_l2=rel, finite=finite, ok=finite and rel < 1e-2, other_ops_rel_l2=variant)
            if not check["ok"]:
                print(f"WARNING: batch {B}: graph replay vs eager step: rel {rel:.3g} finite {finite}", file=sys.stderr)
        for _ in range(args.warmup):
            g.replay()
        torch.cuda.synchronize()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.samples)]
        t_wall = time.perf_counter()
        for s, e in evs:
            s.record()
            g.replay()
            e.record()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t_wall) * 1e3 / args.samples
        ms = sorted(s.elapsed_time(e) for s, e in evs)
        tpot = statistics.median(ms)
        p99 = ms[min(len(ms) - 1, round((len(ms) - 1) * 0.99))]
        kv_bytes = 2 * L * B * nkv * (ctx + 1) * hd * 2
        row = dict(batch=B, context=ctx, tpot_ms=tpot, tpot_p99_ms=p99, back_to_back_ms=wall_ms,
                   tokens_per_s=B / (tpot * 1e-3), weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                   frac_copy_bw=weight_bytes / (tpot * 1e-3) / (copy_gbs * 1e9),
                   frac_copy_bw_with_kv=(weight_bytes + kv_bytes) / (tpot * 1e-3) / (copy_gbs * 1e9))
        if check is not None:
            row["graph_check"] = check
        print(f"batch {B:3d} ctx {ctx:5d}: TPOT {tpot:.3f} ms (p99 {p99:.3f}), {row['tokens_per_s']:.0f} tok/s, "
              f"{row['frac_copy_bw']:.2f} of copy bw (with KV {row['frac_copy_bw_with_kv']:.2f})", file=sys.stderr, flush=True)
        del g, logits
        return row

    rows = []
    max_ctx = max(args.context) + 1
    for B in args.batch:
        # Static KV cache for this batch size, random (never zeros), all contexts share it.
        shape = (L, B, nkv, max_ctx, hd)
        kcache = torch.randn(shape, device=dev, dtype=bf16)
        vcache = torch.randn(shape, device=dev, dtype=bf16)
        tokens = torch.randint(0, V, (B,), device=dev)
        for ci, ctx in enumerate(args.context):
            try:
                rows.append(measure_row(B, ctx, ci == 0, tokens, kcache, vcache))
            except Exception as e:  # one bad row (e.g. out of memory) must not lose the others
                print(f"ERROR: batch {B} ctx {ctx}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rows.append(dict(batch=B, context=ctx, error=f"{type(e).__name__}: {e}"))
        del kcache, vcache
        torch.cuda.empty_cache()

    props = torch.cuda.get_device_properties(0)
    return dict(
        schema_version=1,
        model=dict(cfg, head_dim=hd),
        ops=args.ops,
        copy_gbs=copy_gbs,
        weight_bytes=weight_bytes,
        init_s=init_s,
        rows=rows,
        provenance=dict(gpu_name=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                        cuda=torch.version.cuda, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        command=" ".join([os.path.basename(sys.executable)] + sys.argv)),
    )


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    cfg = load_config(args.config)
    mangrove = load_mangrove(args.mangrove_json)  # fail on a bad file before the GPU work
    if args.torch_json:
        with open(args.torch_json) as f:
            results = json.load(f)
    else:
        results = run_torch(args, cfg)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    p = results["provenance"]
    print(f"torch bf16 decode peer ({results.get('ops', 'naive')} ops) on {p['gpu_name']} (torch {p['torch']}): copy bandwidth {results['copy_gbs']:.0f} GB/s "
          f"(read + write), weight bytes per step {results['weight_bytes'] / 1e9:.3f} GB")
    rows = []
    for r in results["rows"]:
        if "error" in r:
            rows.append([r["batch"], r["context"], "-", "-", "-", "-", "-", "ERROR"])
            continue
        rows.append([r["batch"], r["context"], fmt(r["tpot_ms"]), fmt(r["tpot_p99_ms"]), fmt(r["tokens_per_s"], "{:.0f}"),
                     fmt(r["frac_copy_bw"], "{:.2f}"), fmt(r["frac_copy_bw_with_kv"], "{:.2f}"),
                     "ok" if r.get("graph_check", {}).get("ok", True) else "FAIL"])
    print_table(["batch", "ctx", "tpot_ms", "p99_ms", "tok/s", "frac_bw", "frac_bw+kv", "graph"], rows)
    for r in results["rows"]:
        if "error" in r:
            print(f"batch {r['batch']} ctx {r['context']}: {r['error']}")
    if mangrove:
        combined_table(results, mangrove)
    bad = [r for r in results["rows"] if "error" in r or not r.get("graph_check", {}).get("ok", True)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
