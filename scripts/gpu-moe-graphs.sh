#!/usr/bin/env bash
# MoE decode without host waits, on 2 GPUs: the static-shape decode steps of
# tp_pp, helix, ring and ep on seed-moe-16l verified against the reference,
# then the MoE benchmark (decode in CUDA graphs) beside the calibrated profile.
# Usage: OUT=results bash scripts/gpu-moe-graphs.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for plan in ep:2 tp_pp:2x1 helix:2x1 ring:2; do
  echo "+ shardwise run --static-decode seed-moe-16l --layers 1 $plan"
  timeout 300 python3 -m shardwise run --device cuda --dtype bf16 --static-decode --json "$OUT/verify-moe-static.jsonl" \
    --preset seed-moe-16l --layers 1 --nproc 2 --batch 4 --seq 1024 --steps 4 --plan $plan 2>&1 \
    | grep -E "ok:|FAIL|rror"
done
echo "+ shardwise bench seed-moe-16l --layers 4"
timeout 300 python3 -m shardwise bench --out "$OUT/bench-moe-graphs.jsonl" --dtype bf16 --preset seed-moe-16l \
  --layers 4 --batch 8 --seq 2048 --iters 10 --warmup 3 --phase decode --plan ep:2 --plan tp_pp:2x1 \
  2>&1 | grep -E "FAIL|rror|numerics|graphs|ep:2|tp_pp"
