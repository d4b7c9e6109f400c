#!/usr/bin/env bash
# The all-reduce + add + norm kernel: its 2-GPU test and the GPU-only tests,
# the static decode steps it runs in verified against the reference, and the
# decode benchmarks it changes (seed-helix-4l, batch 16, context 4096).
# Usage: OUT=results/diag bash scripts/gpu-diag-9.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ pytest (GPU-only tests)"
timeout 300 python3 -m pytest -q tests/test_reduce_norm.py tests/test_lse.py tests/test_kernels.py \
  -k "cuda or prefix or fused or triton" 2>&1 | tail -4 | tee "$OUT/gpu-tests.txt"
for args in "--preset seed-helix-4l --batch 4 --seq 2048 --plan tp_pp:2x1" \
            "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan tp_pp:2x1"; do
  echo "+ shardwise verify --static-decode $args"
  timeout 200 python3 -m shardwise verify --device cuda --dtype bf16 --static-decode --steps 4 \
    --json "$OUT/verify-fused.jsonl" $args 2>&1 | grep -E "PASS|FAIL|rror"
done
echo "+ bench decode"
timeout 240 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase decode --batch 16 --seq 4096 \
  --iters 30 --warmup 5 --plan tp_pp:1x1 --plan tp_pp:2x1 --plan helix:2x1 --trace "$OUT/traces-fused" \
  --out "$OUT/bench-fused.jsonl" 2>&1 | grep -E "FAIL|rror|tp_pp|helix"
tar -C "$OUT" --exclude "*.json" -czf "$OUT/traces-fused.tgz" traces-fused && rm -rf "$OUT/traces-fused"
