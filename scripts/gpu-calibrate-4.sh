#!/usr/bin/env bash
# Calibrate the 2-GPU machine (the h200-x2 profile), then the eager,
# host-bound benchmarks the profile's host figures must predict.
# Usage: OUT=results bash scripts/gpu-calibrate-4.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ shardwise calibrate"
time timeout 400 python3 -m shardwise calibrate --out "$OUT/h200-x2.json" --name h200-x2 2>&1 | tail -12
b() { echo "+ shardwise bench $*"; timeout 150 python3 -m shardwise bench --out "$OUT/host-bound.jsonl" --dtype bf16 "$@" 2>&1 | grep -E "FAIL|rror|Traceback|numerics"; }
b --preset small-l2 --iters 10 --warmup 3 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:2x1
b --preset seed-moe-16l --layers 4 --batch 8 --seq 2048 --phase decode --iters 5 --warmup 2 --plan ep:2 --plan tp_pp:2x1
b --preset seed-helix-4l --phase decode --batch 16 --seq 4096 --iters 10 --warmup 3 --plan ring:2
