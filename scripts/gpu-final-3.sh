#!/usr/bin/env bash
# Everything the results README reports for 2 GPUs, at one revision: GPU-only
# tests, every strategy verified in bf16 on its seed preset's dimensions, the
# MoE check, then the benchmarks of scripts/gpu-bench-3.sh.
# Usage: OUT=results bash scripts/gpu-final-3.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
V="$OUT/verify-h200x2.jsonl"
quiet() { grep -v "^\[rank\|^\[[0-9]\|^  \(prefill\|decode\|verifying\)\|^│\|^┃\|^┏\|^┡\|^└\|appended"; }
sw() { echo "+ shardwise $*"; timeout 300 python3 -m shardwise "$@" 2>&1 | quiet; }
echo "+ pytest (GPU kernels)"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_lse.py tests/test_weights.py 2>&1 | tail -2
v() { sw run --device cuda --dtype bf16 --json "$V" "$@"; }
v --preset seed-helix-4l --nproc 2 --batch 4 --seq 2048 --steps 4 \
  --plan tp_pp:2x1 --plan tp_pp:1x2 --plan helix:2x1 --plan helix:1x2 --plan helix:1x2,reduce=flat
v --preset seed-ring-4l --nproc 2 --batch 2 --seq 2048 --steps 4 --plan ring:2 --plan tp_pp:2x1
for L in 2 4; do
  v --preset seed-moe-16l --layers $L --nproc 2 --batch 4 --seq 1024 --steps 4 \
    --plan ep:2 --plan tp_pp:2x1 --plan tp_pp:2x1,reduce=model
done
v --preset small-l2 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:1x2
v --preset seed-layerwise-30b --layers 4 --nproc 2 --batch 2 --seq 256 --steps 4 \
  --plan layerwise:cap=8GB --plan tp_pp:2x1
bash scripts/gpu-bench-3.sh
