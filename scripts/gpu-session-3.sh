#!/usr/bin/env bash
# MoE verification in bf16 (reduce=fp32 partial sums for tp_pp) and the
# single- and two-GPU benchmarks after the fused GELU epilogue and the
# per-step position tensors; then the prefill anatomy on one GPU.
# Usage: OUT=results bash scripts/gpu-session-3.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for L in 2 4; do
  echo "+ shardwise run --preset seed-moe-16l --layers $L ..."
  timeout 300 python3 -m shardwise run --device cuda --preset seed-moe-16l --layers $L --nproc 2 --batch 4 \
     --seq 1024 --steps 4 --dtype bf16 --plan ep:2 --plan tp_pp:2x1 --plan tp_pp:2x1,reduce=model \
     --json "$OUT/verify-moe.jsonl" 2>&1 | grep -E "ok:|FAILED|rror"
done
B="$OUT/bench.jsonl"
sw() { echo "+ shardwise $*"; timeout 400 python3 -m shardwise "$@" --out "$B" 2>&1 | grep -v "^\[rank" | tail -30; }
sw bench --preset seed-helix-4l --dtype bf16 --phase prefill --batch 8 --seq 8192 --iters 5 --warmup 2 \
   --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1
sw bench --preset seed-helix-4l --dtype bf16 --phase decode --batch 16 --seq 4096 --iters 30 --warmup 5 \
   --plan torch_eager:1 --plan tp_pp:1x1 --plan tp_pp:2x1 --plan helix:2x1
timeout 200 python3 scripts/prefill-anatomy.py 2>&1 | tail -45
