#!/usr/bin/env bash
# Benchmarks on a machine with 2 GPUs: seed-helix-4l dimensions in bf16,
# prefill (batch 8, sequence 8192 = 64K tokens a step) and decode (batch 16,
# context 4096), 1 and 2 GPUs, with PyTorch's own single-device model and
# DTensor tensor parallel timed in the same run.
# Usage: OUT=results bash scripts/gpu-bench-2.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
B="$OUT/bench-h200x2.jsonl"
sw() { echo "+ shardwise $*"; python3 -m shardwise "$@" --out "$B" 2>&1 | grep -v "^\[rank"; }
sw bench --preset seed-helix-4l --dtype bf16 --phase prefill --batch 8 --seq 8192 --iters 5 --warmup 2 \
   --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1 --plan helix:1x2 \
   --plan helix:2x1 --plan tp_pp:1x2,mb=4 --plan ring:2
sw bench --preset seed-helix-4l --dtype bf16 --phase decode --batch 16 --seq 4096 --iters 30 --warmup 5 \
   --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1 --plan helix:1x2 \
   --plan helix:2x1 --plan tp_pp:1x2 --plan ring:2
