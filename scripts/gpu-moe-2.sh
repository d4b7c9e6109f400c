#!/usr/bin/env bash
# MoE on 2 GPUs: ep:2 against tp_pp:2x1 on seed-moe-16l dims (4 layers),
# the bf16 check again, the same check in fp32 (routing cannot flip there),
# and the GPU-only unit tests of the fused attention-with-lse path.
# Usage: OUT=results bash scripts/gpu-moe-2.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
sw() { echo "+ shardwise $*"; timeout 300 python3 -m shardwise "$@" 2>&1 | grep -v "^\[rank\|^\[[0-9]\|^  \(prefill\|decode\|verifying\|ok\)"; }
sw run --device cuda --preset seed-moe-16l --layers 2 --nproc 2 --batch 4 --seq 1024 --steps 4 --dtype fp32 \
   --plan ep:2 --plan tp_pp:2x1 --json "$OUT/verify-h200x2-moe.jsonl"
sw bench --out "$OUT/bench-h200x2.jsonl" --preset seed-moe-16l --layers 4 --dtype bf16 --batch 8 \
   --seq 2048 --iters 5 --warmup 2 --plan ep:2 --plan tp_pp:2x1
echo "+ pytest tests/test_lse.py"
python3 -m pytest -q -p no:cacheprovider tests/test_lse.py 2>&1 | tail -3
