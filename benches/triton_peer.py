#!/usr/bin/env python3
"""Triton and torch peers of mangrove's decode kernels, on the same problems and data layout.

Runs on a GPU box with torch + triton (e.g. the H100: torch 2.11, triton 3.6):

* a Triton ternary GEMV over mangrove's packed layout (uint8 [N/4, K]; byte (j, k) holds rows
  j + s*N/4 in bits 2s..2s+1, stored as w+1), bf16 activations, f32 accumulation, deterministic
  split-K (the last program of a tile sums the partials in split order, as mangrove does),
  autotuned with @triton.autotune over BLOCK_N x BLOCK_K x num_warps x num_stages x SPLIT_K;
* torch bf16 matmul (F.linear, cuBLAS) at the same shapes with the weights as dense bf16;
* a Triton MoE gate_up peer: routed ternary experts (weights [E, I/4, H] per projection, f32
  scale per expert), act[t*TOPK + slot] = silu(s_g * Wg_e x_t) * (s_u * Wu_e x_t), vLLM's
  moe_align_block_size routing (sorted pair ids padded per expert to BLOCK_M with the sentinel
  M*TOPK, one expert per BLOCK_M block), autotuned per BLOCK_M.

Every kernel is checked once against an f32 torch reference (max_rel <= 1e-2 against
max(|ref|, 1e-3 max|ref|), mangrove's lab gate) and a failing one is reported, not timed.
Timing: weights rotated over copies that together exceed twice the L2, launches captured in a
CUDA graph that walks the whole ring (so Python launch overhead is not timed), median per launch
of --samples replays. --mangrove-json takes the JSON of `mangrove bench kernels` and prints one
combined table; --out writes this script's own JSON.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

GATE_MAX_REL = 1e-2
GATE_REL_FLOOR = 1e-3

BITNET_2B = [("qkv", 3840, 2560), ("o", 2560, 2560), ("gate_up", 13824, 2560), ("down", 2560, 6912)]
GEMV_MS = [1, 8]
MOE_DEFAULT = dict(experts=64, topk=8, hidden=2048, inter=1408)
GATEUP_MS = [1, 16, 128]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mangrove-json", help="report of `mangrove bench kernels --json` (cases and mangrove's numbers)")
    p.add_argument("--out", help="write this script's results as JSON here")
    p.add_argument("--samples", type=int, default=30, help="timed graph replays per kernel (median reported)")
    p.add_argument("--space", choices=["small", "full"], default="small",
                   help="autotune space: small (fits a 10-minute run) or full (closer to mangrove's sweep)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-graph", action="store_true", help="time plain stream launches instead of CUDA graph replays")
    a = p.parse_args(argv)
    if a.samples < 1:
        p.error("--samples must be at least 1")
    return a


def cases_from(report):
    """(label, problem dict, m) of every case: from mangrove's report, else the defaults."""
    if report is None:
        out = [(f"{name} {n}x{k} M={m}", dict(kind="gemv", name=name, n=n, k=k), m) for name, n, k in BITNET_2B for m in GEMV_MS]
        d = MOE_DEFAULT
        out += [(f"moe_gateup E{d['experts']} top{d['topk']} {d['hidden']}x{d['inter']} M={m}", dict(kind="gateup", **d), m)
                for m in GATEUP_MS]
        return out
    if report.get("schema_version") != 1:
        sys.exit(f"error: mangrove report has schema_version {report.get('schema_version')}, this script reads 1")
    return [(c["label"], c["problem"], c["m"]) for c in report["cases"]]


def mangrove_numbers(report):
    """label -> dict of mangrove's figures (median µs by variant, copy limit)."""
    out = {}
    for c in (report or {}).get("cases", []):
        v = {x["variant"]: x["derived"].get("median_us") for x in c["variants"]}
        out[c["label"]] = dict(copy_limit_us=c.get("copy_limit_us"), variants=v)
    return out


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    report = None
    if args.mangrove_json:
        with open(args.mangrove_json) as f:
            report = json.load(f)
    cases = cases_from(report)

    import torch  # kept inside main (with triton) so --help works without them

    import peer_common
    import triton

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_peer_kernels as kern

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to torch")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    sms = props.multi_processor_count
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 references in full f32
    gemv_kernel, moe_kernel = kern.autotuned(args.space, sms)

    # ----------------------------------------------------------------------------- harness

    def rotation_count(nbytes):
        return max(1, min(4096, math.ceil(2 * l2_bytes / max(nbytes, 1))))

    def time_launches(launch, copies):
        """Median µs per launch of launch(i) (i picks the weight copy), every launch of a graph
        (or batch) walking the whole ring of `copies` weight copies."""
        per = copies * max(1, math.ceil(16 / copies))
        for i in range(per):  # warm-up (and autotune outside any capture)
            launch(i)
        torch.cuda.synchronize()
        if args.no_graph:
            run = lambda: [launch(i) for i in range(per)]  # noqa: E731
        else:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(per):
                    launch(i)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                for i in range(per):
                    launch(i)
            run = g.replay
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        us = []
        for _ in range(args.samples):
            start.record()
            run()
            stop.record()
            stop.synchronize()
            us.append(start.elapsed_time(stop) * 1e3 / per)
        return statistics.median(us)

    def deltas(out, ref):
        out, ref = out.float(), ref.float()
        scale = ref.abs().max().item()
        floor = max(GATE_REL_FLOOR * scale, 1e-30)
        nonfinite = int((~torch.isfinite(out)).sum().item())
        rel = ((out - ref).abs() / ref.abs().clamp_min(floor)).nan_to_num(nan=math.inf).max().item()
        return dict(max_rel=rel, non_finite=nonfinite, passed=nonfinite == 0 and rel <= GATE_MAX_REL)

    def measure(name, check, launch, copies, extra=None):
        """Checks once, then times; a failing or erroring kernel is reported, not timed."""
        row = dict(variant=name, **(extra or {}))
        try:
            d = check()
            row["check"] = d
            if not d["passed"]:
                row["status"] = f"failed: max_rel={d['max_rel']:.3e} non_finite={d['non_finite']}"
                return row
            row["median_us"] = time_launches(launch, copies)
            row["status"] = "timed"
        except Exception as e:  # a broken config or OOM: report it and go on
            row["status"] = f"error: {type(e).__name__}: {e}"
        return row

    def random_packed(rows4, k):
        codes = torch.randint(0, 3, (4, rows4, k), dtype=torch.uint8, device=dev)
        return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)

    def unpack(packed):
        """Dense [4*rows4, k] ternary values of packed [rows4, k] (row j + s*rows4 = plane s)."""
        return torch.cat([((packed >> (2 * s)) & 3).to(torch.int8) - 1 for s in range(4)], dim=0)

    def copy_bandwidth_gbs():
        return peer_common.copy_bandwidth_gbs(dev)

    # ----------------------------------------------------------------------------- cases

    def gemv_case(n, k, m):
        packed = random_packed(n // 4, k)
        x = (torch.rand(m, k, device=dev) * 4 - 2).to(torch.bfloat16)
        scale = (0.5 + torch.rand(()).item()) / math.sqrt(k)
        dense = unpack(packed).to(torch.bfloat16)
        ref = x.float() @ dense.float().t()
        y = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        ring = [packed] + [packed.clone() for _ in range(rotation_count(packed.numel()) - 1)]
        dring = [dense] + [dense.clone() for _ in range(rotation_count(2 * dense.numel()) - 1)]
        op = kern.TritonGemv(gemv_kernel, m, n, k, dev)
        out = []

        def check_triton():
            y.fill_(float("nan"))
            op(packed, x, y, scale)
            torch.cuda.synchronize()
            return deltas(y, ref * scale)

        tri = measure("triton", check_triton, lambda i: op(ring[i % len(ring)], x, y, scale), len(ring))
        tri["config"] = kern.best_config(gemv_kernel)
        tri["min_bytes"] = n // 4 * k + 2 * m * k + 2 * m * n
        out.append(tri)

        def check_torch():
            return deltas(torch.nn.functional.linear(x, dense), ref)

        yt = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        tor = measure("torch", check_torch, lambda i: torch.matmul(x, dring[i % len(dring)].t(), out=yt), len(dring))
        tor["min_bytes"] = 2 * (n * k + m * k + m * n)
        out.append(tor)
        return out, n // 4 * k + 2 * m * k + 2 * m * n

    def align_block_size(topk_ids, experts, block_m):
        """mangrove::routing::align_block_size: pair ids grouped by ascending expert (ascending
        pair id inside), each group padded to block_m with the sentinel; block -> expert."""
        flat = topk_ids.flatten().cpu()
        pairs = flat.numel()
        ids, blocks = [], []
        for e in range(experts):
            group = (flat == e).nonzero().flatten().tolist()
            if not group:
                continue
            padded = -(-len(group) // block_m) * block_m
            ids += group + [pairs] * (padded - len(group))
            blocks += [e] * (padded // block_m)
        return (torch.tensor(ids, dtype=torch.int32, device=dev), torch.tensor(blocks, dtype=torch.int32, device=dev), len(ids))

    def gateup_case(p, m):
        e, topk, h, inter = p["experts"], p["topk"], p["hidden"], p["inter"]
        i4 = inter // 4
        x = (torch.rand(m, h, device=dev) * 4 - 2).to(torch.bfloat16)
        wg = torch.stack([random_packed(i4, h) for _ in range(e)])
        wu = torch.stack([random_packed(i4, h) for _ in range(e)])
        sg = ((0.5 + torch.rand(e, device=dev)) / math.sqrt(h)).float()
        su = ((0.5 + torch.rand(e, device=dev)) / math.sqrt(h)).float()
        topk_ids = torch.rand(m, e, device=dev).argsort(dim=1)[:, :topk].contiguous()
        flat = topk_ids.flatten()
        used = sorted(set(flat.tolist()))
        # f32 reference, expert by expert.
        ref = torch.empty(m * topk, inter, dtype=torch.float32, device=dev)
        for ex in used:
            pairs = (flat == ex).nonzero().flatten()
            xe = x[pairs // topk].float()
            g = sg[ex] * (xe @ unpack(wg[ex]).float().t())
            u = su[ex] * (xe @ unpack(wu[ex]).float().t())
            ref[pairs] = torch.nn.functional.silu(g) * u
        act = torch.empty(m * topk, inter, dtype=torch.bfloat16, device=dev)
        copies = rotation_count(2 * len(used) * i4 * h)
        ring = [(wg, wu)] + [(wg.clone(), wu.clone()) for _ in range(copies - 1)]
        best = None
        tried = []
        for block_m in (16, 32, 64):
            ids, blocks, em = align_block_size(topk_ids, e, block_m)
            num_m = em // block_m

            def launch(i, ids=ids, blocks=blocks, num_m=num_m, block_m=block_m):
                a, b = ring[i % len(ring)]
                kern.launch_moe(moe_kernel, x, a, b, sg, su, ids, blocks, act, m * topk, num_m, h, inter, topk, block_m)

            def check(launch=launch):
                act.fill_(float("nan"))
                launch(0)
                torch.cuda.synchronize()
                return deltas(act, ref)

            row = measure("triton", check, launch, len(ring), dict(block_m=block_m))
            row["config"] = dict(kern.best_config(moe_kernel) or {}, BLOCK_M=block_m)
            tried.append(row)
            if "median_us" in row and (best is None or row["median_us"] < best["median_us"]):
                best = row
        if best is None:  # every BLOCK_M failed: report the first failure
            best = tried[0]
        best = dict(best, tried=[dict(block_m=t["block_m"], status=t["status"], median_us=t.get("median_us")) for t in tried])
        best["min_bytes"] = 2 * len(used) * i4 * h + 2 * m * h + 2 * m * topk * inter
        return [best], best["min_bytes"]

    # ----------------------------------------------------------------------------- run

    copy_bw = copy_bandwidth_gbs()
    print(f"triton_peer: {props.name}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth {copy_bw:.0f} GB/s",
          file=sys.stderr)
    results = []
    for label, problem, m in cases:
        t0 = time.time()
        if problem["kind"] == "gemv":
            rows, ternary_bytes = gemv_case(problem["n"], problem["k"], m)
        elif problem["kind"] == "gateup":
            rows, ternary_bytes = gateup_case(problem, m)
        else:
            print(f"triton_peer: skipping {label}: unknown problem kind {problem['kind']}", file=sys.stderr)
            continue
        print(f"triton_peer: {label}: {', '.join(r['variant'] + ' ' + r['status'] for r in rows)} ({time.time() - t0:.0f} s)",
              file=sys.stderr)
        results.append(dict(label=label, problem=problem, m=m, ternary_min_bytes=ternary_bytes,
                            copy_limit_us=ternary_bytes / copy_bw / 1e3, rows=rows))
        torch.cuda.empty_cache()

    mg = mangrove_numbers(report)
    table = combined_table(results, mg, copy_bw)
    print(table)
    if args.out:
        meta = dict(gpu=props.name, sm_count=sms, l2_bytes=l2_bytes, torch=torch.__version__, triton=triton.__version__,
                    cuda=torch.version.cuda, copy_bw_gbs=copy_bw, space=args.space, samples=args.samples,
                    timing="cuda-graph replays" if not args.no_graph else "stream launches",
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join(sys.argv),
                    mangrove_json=args.mangrove_json,
                    mangrove_provenance=(report or {}).get("provenance"))
        with open(args.out, "w") as f:
            json.dump(dict(schema_version=1, meta=meta, cases=results, table=table), f, indent=2)
            f.write("\n")
        print(f"triton_peer: wrote {args.out}", file=sys.stderr)
    failed = [f"{r['label']}: {row['variant']}: {row['status']}" for r in results for row in r["rows"] if row["status"] != "timed"]
    if failed:
        print("triton_peer: not timed:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


def combined_table(results, mg, copy_bw):
    """One table: shape, M, copy-limit µs, cuBLAS / torch µs, Triton µs, mangrove tuned µs (bf16
    and W2A8), mangrove speedup over Triton."""
    def f(v, spec="{:.2f}"):
        return "-" if v is None else spec.format(v)

    head = (f"{'shape':<34} {'M':>4} {'copy-lim':>9} {'cuBLAS':>8} {'torch':>8} {'Triton':>8} "
            f"{'mg bf16':>8} {'mg W2A8':>8} {'bf16/Tri':>8} {'W2A8/Tri':>8}")
    lines = [f"copy bandwidth {copy_bw:.0f} GB/s (torch); µs per launch, median; x/Tri = Triton µs / mangrove µs", head]
    for r in results:
        rows = {row["variant"]: row.get("median_us") for row in r["rows"]}
        m = mg.get(r["label"], {})
        mv = m.get("variants", {})
        template = "moe_gateup" if r["problem"]["kind"] == "gateup" else "ternary_gemv"
        bf16 = mv.get(f"tuned {template}")
        w2a8 = mv.get("tuned ternary_gemv_w2a8") if template == "ternary_gemv" else None
        tri = rows.get("triton")
        shape = r["label"].rsplit(" M=", 1)[0]
        limit = m.get("copy_limit_us") or r["copy_limit_us"]
        lines.append(
            f"{shape:<34} {r['m']:>4} {f(limit):>9} {f(mv.get('cublas bf16')):>8} {f(rows.get('torch')):>8} {f(tri):>8} "
            f"{f(bf16):>8} {f(w2a8):>8} {f(tri / bf16 if tri and bf16 else None, '{:.2f}x'):>8} "
            f"{f(tri / w2a8 if tri and w2a8 else None, '{:.2f}x'):>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
