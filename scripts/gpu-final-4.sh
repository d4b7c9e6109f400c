#!/usr/bin/env bash
# The 2-GPU machine's profile and every benchmark, in one run on one machine:
# shardwise calibrate (the h200-x2 profile), then scripts/gpu-bench-3.sh.
# Usage: OUT=results bash scripts/gpu-final-4.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ shardwise calibrate --out $OUT/h200-x2.json --name h200-x2"
timeout 200 python3 -m shardwise calibrate --out "$OUT/h200-x2.json" --name h200-x2 2>&1 | tail -8
OUT=$OUT bash "$(dirname "$0")/gpu-bench-3.sh"
