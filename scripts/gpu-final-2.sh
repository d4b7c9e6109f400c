#!/usr/bin/env bash
# Calibrate the 2-GPU machine again (the profile now records the sustained
# matmul rate, the streaming read rate, the FlashAttention-2 rate and kernel
# costs), re-run the seed-helix-4l benchmarks at this revision, and check
# that a hung rank under NCCL is named by the watchdog and ended cleanly.
# Usage: OUT=results bash scripts/gpu-final-2.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ shardwise calibrate"
timeout 400 python3 -m shardwise calibrate --out "$OUT/h200-x2.json" --name h200-x2 2>&1 | tail -3
OUT=$OUT bash scripts/gpu-bench-2.sh 2>&1 | grep -E "^\+|│ [a-z_]+:|matmul peak|rror"
echo "+ shardwise verify ... --inject-fault 1:hang --watchdog 20 (must end, naming rank 1)"
timeout 200 python3 -m shardwise verify --preset tiny-dense --plan tp_pp:2x1 --device cuda \
   --inject-fault 1:hang --watchdog 20 2>&1 | grep -v "^\[rank" | tail -8
echo "exit code: ${PIPESTATUS[0]}"
