#!/usr/bin/env bash
# MoE decode in CUDA graphs (scripts/gpu-moe-graphs.sh) with the GPU-only
# tests; profiles of the static-shape decode steps that 1- and 2-GPU tp_pp
# replay in graphs; decode GEMMs, cuBLAS against Triton, and the residual in
# a prefill GEMM's epilogue (scripts/skinny-gemm.py).
# Usage: OUT=results/diag bash scripts/gpu-diag-8.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ pytest (GPU-only tests)"
timeout 300 python3 -m pytest -q tests/test_lse.py tests/test_kernels.py -k "cuda or prefix or fused or triton" \
  2>&1 | tail -3 | tee "$OUT/gpu-tests.txt"
OUT=$OUT bash "$(dirname "$0")/gpu-moe-graphs.sh"
echo "+ bench --trace decode"
timeout 200 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase decode --batch 16 --seq 4096 \
  --iters 20 --warmup 3 --plan tp_pp:1x1 --plan tp_pp:2x1 --trace "$OUT/traces-decode" \
  --out "$OUT/trace-decode.jsonl" 2>&1 | grep -E "FAIL|rror|tp_pp"
tar -C "$OUT" --exclude "*.json" -czf "$OUT/traces-decode.tgz" traces-decode && rm -rf "$OUT/traces-decode"
echo "+ skinny-gemm"
timeout 240 python3 scripts/skinny-gemm.py 2>&1 | grep -E "^\{|rror"
