#!/usr/bin/env bash
# Profiles of decode steps as bench times them: each a replay of its CUDA
# graph (bench --trace), so the traces hold the graph's kernels and the gaps
# between them. seed-helix-4l on 1 and 2 GPUs, small-l2 on 2.
# Usage: OUT=results/diag bash scripts/gpu-trace-graphs.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
B="$OUT/bench-graph-traces.jsonl"
T="$OUT/traces-graphs"
b() { echo "+ shardwise bench $*"; timeout 200 python3 -m shardwise bench --out "$B" --dtype bf16 --trace "$T" "$@" 2>&1 | grep -E "FAIL|rror|Traceback"; }
b --preset seed-helix-4l --phase decode --batch 16 --seq 4096 --iters 30 --warmup 5 \
  --plan tp_pp:1x1 --plan tp_pp:2x1 --plan helix:1x2 --plan helix:2x1 --plan ring:2
b --preset small-l2 --phase decode --iters 50 --warmup 10 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:2x1
tar czf "$OUT/traces-graphs.tgz" -C "$OUT" traces-graphs && rm -rf "$T"
