#!/usr/bin/env bash
# L2 prefetch beside a decode step's all-reduces; tp_pp prefill in 2 and 4
# overlapped chunks against 1 GPU (seed-helix-4l, 8 x 8192).
# Usage: OUT=results/diag bash scripts/gpu-diag-7.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ l2-prefetch"
timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 scripts/l2-prefetch.py 2>&1 | grep -E "^\{|rror"
echo "+ bench prefill"
timeout 300 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase prefill --batch 8 --seq 8192 \
  --iters 5 --warmup 2 --plan tp_pp:1x1 --plan tp_pp:2x1 --plan tp_pp:2x1,overlap=2 --plan tp_pp:2x1,overlap=8 \
  --out "$OUT/chunks.jsonl" 2>&1 | grep -E "FAIL|rror|ok:|tp_pp"
