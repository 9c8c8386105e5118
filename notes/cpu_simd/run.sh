#!/usr/bin/env bash
# bench decode of the SIMD CPU backend (defaults, then tuned by tuning_db/<cpu>/) and the f64
# reference on a bitnet-2b preset checkpoint, in one sitting; outputs under $OUT.
# Usage: notes/cpu_simd/run.sh MANGROVE_BIN MODEL_DIR OUT [REPS]
set -euo pipefail
M=$1 MODEL=$2 OUT=$3 REPS=${4:-3}
DB=tuning_db/$(ls tuning_db | grep -v -e h100 -e h200 -e README | head -1)
mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt"
for r in $(seq 1 "$REPS"); do
  uptime >> "$OUT/load.txt"
  "$M" bench decode --model "$MODEL" --backend cpu --batch 1,4,8 --steps 16 --json > "$OUT/cpu_rep$r.json"
  uptime >> "$OUT/load.txt"
  "$M" bench decode --model "$MODEL" --backend cpu --batch 1,4,8 --steps 16 --tuning-db "$DB" --json > "$OUT/cpu_tuned_rep$r.json"
done
for isa in avx2 avx-vnni; do
  MANGROVE_CPU_ISA=$isa "$M" bench decode --model "$MODEL" --backend cpu --batch 1 --steps 16 --json > "$OUT/cpu_$isa.json"
done
uptime >> "$OUT/load.txt"
"$M" bench decode --model "$MODEL" --backend cpu-ref --batch 1 --steps 4 --json > "$OUT/cpu_ref.json"
uptime >> "$OUT/load.txt"
