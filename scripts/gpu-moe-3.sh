#!/usr/bin/env bash
# MoE on 2 GPUs (bf16): verification with the routing-flip analysis at 2 and
# 4 layers of seed-moe-16l, then the MoE benchmark (ep:2 against tp_pp:2x1).
# Usage: OUT=results bash scripts/gpu-moe-3.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
quiet() { grep -v "^\[rank\|^\[[0-9]\|^  \(prefill\|decode\|verifying\)\|^│\|^┃\|^┏\|^┡\|^└\|appended"; }
for L in 2 4; do
  echo "+ shardwise run --preset seed-moe-16l --layers $L ..."
  timeout 300 python3 -m shardwise run --device cuda --dtype bf16 --json "$OUT/verify-h200x2.jsonl" \
    --preset seed-moe-16l --layers $L --nproc 2 --batch 4 --seq 1024 --steps 4 \
    --plan ep:2 --plan tp_pp:2x1 --plan tp_pp:2x1,reduce=model 2>&1 | quiet | grep -E "ok:|FAILED|rror"
done
echo "+ shardwise bench --preset seed-moe-16l --layers 4 ..."
timeout 300 python3 -m shardwise bench --out "$OUT/bench-h200x2.jsonl" --dtype bf16 --preset seed-moe-16l \
  --layers 4 --batch 8 --seq 2048 --iters 5 --warmup 2 --plan ep:2 --plan tp_pp:2x1 2>&1 | quiet
