#!/usr/bin/env bash
# Second part of the 2-GPU measurements: prefill on seed-helix-4l dims (64K
# tokens a step), ring against tp_pp over sequence length on seed-ring-4l dims
# (head_dim 512, one layer), each strategy on its own seed preset (fewer
# layers), MoE numerics again, and a calibrated profile of the machine.
# Usage: OUT=results bash scripts/gpu-bench-2b.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
B="$OUT/bench-h200x2.jsonl"
sw() { echo "+ shardwise $*"; timeout 300 python3 -m shardwise "$@" 2>&1 | grep -v "^\[rank\|^\[[0-9]\|^  \(prefill\|decode\|verifying\|ok\)"; }
sw run --device cuda --preset seed-moe-16l --layers 2 --nproc 2 --batch 4 --seq 1024 --steps 4 --dtype bf16 \
   --plan ep:2 --plan tp_pp:2x1 --json "$OUT/verify-h200x2.jsonl"
sw bench --out "$B" --preset seed-helix-4l --dtype bf16 --phase prefill --batch 8 --seq 8192 \
   --iters 5 --warmup 2 --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1 \
   --plan helix:1x2 --plan helix:2x1 --plan tp_pp:1x2,mb=4 --plan ring:2
for L in 4096 16384 32768; do
  sw bench --out "$B" --preset seed-ring-4l --layers 1 --dtype bf16 --phase prefill --batch 1 \
     --seq $L --iters 3 --warmup 1 --plan ring:2 --plan tp_pp:2x1
done
sw bench --out "$B" --preset seed-moe-16l --layers 4 --dtype bf16 --batch 8 --seq 2048 \
   --iters 5 --warmup 2 --plan ep:2 --plan tp_pp:2x1
sw bench --out "$B" --preset seed-layerwise-30b --layers 4 --dtype bf16 --batch 4 --seq 2048 \
   --iters 5 --warmup 2 --nproc 2 --plan layerwise:cap=16GB --plan tp_pp:2x1 --plan tp_pp:1x2,mb=4
sw bench --out "$B" --preset small-l2 --iters 10 --warmup 3 --nproc 2 --plan layerwise:cap=L2 \
   --plan tp_pp:2x1
echo "+ shardwise calibrate"
timeout 400 python3 -m shardwise calibrate --out "$OUT/h200-x2.json" --name h200-x2 2>&1 | tail -15
