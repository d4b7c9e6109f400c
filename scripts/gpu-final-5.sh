#!/usr/bin/env bash
# The 2-GPU machine's profile and every benchmark, in one run on one machine:
# the GPU-only tests, the static-shape decode steps (the ones bench replays in
# CUDA graphs, MoE's included) verified against the reference, shardwise
# calibrate (the h200-x2 profile), then scripts/gpu-bench-3.sh.
# Usage: OUT=results bash scripts/gpu-final-5.sh   (from the repository root)
# VERIFY_2GPU="ARGS" adds one static-decode verification; PLANS_2GPU is passed
# on to gpu-bench-3.sh. (The runs at ad6beec and 005f7b7 added layerwise:cap=HBM
# through them; it is in both lists since 44febda.)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ pytest (GPU-only tests)"
timeout 300 python3 -m pytest -q tests/test_reduce_norm.py tests/test_lse.py tests/test_kernels.py \
  -k "cuda or prefix or fused or triton" 2>&1 | tail -3 | tee "$OUT/gpu-tests.txt"
V="$OUT/verify-static-h200x2.jsonl"
for args in "--preset seed-helix-4l --batch 4 --seq 2048 --plan ring:2" \
            "--preset seed-helix-4l --batch 4 --seq 2048 --plan tp_pp:2x1" \
            "--preset seed-helix-4l --batch 4 --seq 2048 --plan helix:2x1" \
            "--preset seed-ring-4l --batch 2 --seq 2048 --plan ring:2" \
            "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan ep:2" \
            "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan tp_pp:2x1" \
            "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan helix:2x1" \
            "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan ring:2" \
            "--preset seed-helix-4l --batch 4 --seq 2048 --nproc 2 --plan layerwise:cap=HBM" \
            ${VERIFY_2GPU:+"$VERIFY_2GPU"}; do
  echo "+ shardwise verify --static-decode $args"
  timeout 200 python3 -m shardwise verify --device cuda --dtype bf16 --static-decode --steps 4 \
    --json "$V" $args 2>&1 | grep -E "PASS|FAIL|rror"
done
echo "+ shardwise calibrate --out $OUT/h200-x2.json --name h200-x2"
timeout 200 python3 -m shardwise calibrate --out "$OUT/h200-x2.json" --name h200-x2 2>&1 | tail -8
OUT=$OUT bash "$(dirname "$0")/gpu-bench-3.sh"
