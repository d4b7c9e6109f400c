#!/usr/bin/env bash
# Per-rank profiles (bench --trace) of the eager steps the cost model
# mispredicts and of the 1- and 2-GPU decode step; the host-op and kernel
# tables come back in one archive.
# Usage: OUT=results/diag bash scripts/gpu-diag-5.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
quiet() { grep -E "FAIL|rror|Traceback|numerics|ok:"; }
b() { echo "+ shardwise bench $*"; timeout 200 python3 -m shardwise bench --dtype bf16 "$@" 2>&1 | quiet; }
T="--trace $OUT/traces --out $OUT/trace.jsonl"
b --preset small-l2 --iters 5 --warmup 2 --nproc 2 --plan tp_pp:2x1 --plan layerwise:cap=L2 $T
SHARDWISE_ONE_SHOT=0 b --preset small-l2 --iters 5 --warmup 2 --plan tp_pp:2x1 \
  --trace $OUT/traces-nccl --out $OUT/trace-nccl.jsonl
b --preset seed-helix-4l --phase decode --batch 16 --seq 4096 --iters 10 --warmup 3 \
  --plan tp_pp:1x1 --plan tp_pp:2x1 --plan ring:2 $T
b --preset seed-moe-16l --layers 2 --batch 8 --seq 2048 --phase decode --iters 3 --warmup 2 \
  --plan ep:2 --plan tp_pp:2x1 $T
tar czf "$OUT/traces.tgz" -C "$OUT" $(cd "$OUT" && ls -d traces*/*.txt)
rm -rf "$OUT"/traces "$OUT"/traces-nccl
ls -la "$OUT"
