#!/usr/bin/env bash
# The 2-GPU benchmarks: seed-helix-4l prefill and decode for every plan and
# the PyTorch peers, small-l2, MoE, layerwise, and ring against tp_pp and
# context_parallel over sequence length.
# Usage: OUT=results bash scripts/gpu-bench-3.sh   (from the repository root)
# PLANS_2GPU="--plan P ..." adds plans to the seed-helix-4l prefill and decode
# benchmarks (layerwise:cap=HBM, replicas of the whole model, is one of them
# since 44febda; before, it came as PLANS_2GPU="--plan layerwise:cap=HBM").
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
B="$OUT/bench-h200x2.jsonl"
quiet() { grep -E "FAIL|rror|Traceback|numerics"; }
b() { echo "+ shardwise bench $*"; timeout 200 python3 -m shardwise bench --out "$B" --dtype bf16 "$@" 2>&1 | quiet; }
b --preset seed-helix-4l --phase prefill --batch 8 --seq 8192 --iters 5 --warmup 2 \
  --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1 --plan tp_pp:2x1,overlap=4 --plan helix:1x2 \
  --plan helix:2x1 --plan tp_pp:1x2,mb=4 --plan ring:2 --plan torch_cp:2 --plan layerwise:cap=HBM ${PLANS_2GPU:-}
b --preset seed-helix-4l --phase decode --batch 16 --seq 4096 --iters 30 --warmup 5 \
  --plan torch_eager:1 --plan tp_pp:1x1 --plan torch_tp:2 --plan tp_pp:2x1 --plan tp_pp:2x1,overlap=4 --plan helix:1x2 \
  --plan helix:2x1 --plan tp_pp:1x2 --plan ring:2 --plan layerwise:cap=HBM ${PLANS_2GPU:-}
b --preset small-l2 --iters 50 --warmup 10 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:2x1
b --preset seed-moe-16l --layers 4 --batch 8 --seq 2048 --iters 5 --warmup 2 --plan ep:2 --plan tp_pp:2x1
b --preset seed-layerwise-30b --layers 4 --batch 4 --seq 2048 --iters 5 --warmup 2 --nproc 2 \
  --plan layerwise:cap=16GB --plan tp_pp:2x1 --plan tp_pp:1x2,mb=4
for L in 4096 16384 32768; do
  b --preset seed-ring-4l --layers 1 --phase prefill --batch 1 --seq $L --iters 3 --warmup 1 \
    --plan ring:2 --plan tp_pp:2x1 --plan torch_cp:2
done
