#!/usr/bin/env python3
"""One table from notes/cpu_simd/run.sh's JSON: tokens/s per backend and batch (median and best over reps)."""
import json, statistics, sys, glob, os
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    label = name.split("_rep")[0]
    rep = json.load(open(path))
    for r in rep["runs"]:
        rows.setdefault((label, r["batch"]), []).append((r["tokens_per_s"], r["tpot_p50_ms"], r["ttft_ms"], rep["copy_gbs"], r.get("fraction_of_bound")))
print("| run | batch | tokens/s median (best) | TPOT p50 ms median | TTFT ms median | read GB/s | fraction of bound (median) | reps |")
print("|---|---|---|---|---|---|---|---|")
for (label, b), v in sorted(rows.items()):
    tps = [x[0] for x in v]
    print(f"| {label} | {b} | {statistics.median(tps):.1f} ({max(tps):.1f}) | {statistics.median(x[1] for x in v):.1f} | "
          f"{statistics.median(x[2] for x in v):.0f} | {statistics.median(x[3] for x in v):.1f} | "
          f"{100 * statistics.median(x[4] for x in v):.0f}% | {len(v)} |")
