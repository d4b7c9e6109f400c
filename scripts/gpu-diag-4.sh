#!/usr/bin/env bash
# Diagnostics on 2 GPUs: copy-engine pulls beside a GEMM against NCCL beside
# it; per-rank profiles (bench --trace) of the host-bound eager steps and of
# the 1- and 2-GPU decode step; NCCL's CTA count in the overlapped prefill;
# MoE verification at 1 layer.
# Usage: OUT=results/diag bash scripts/gpu-diag-4.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
quiet() { grep -E "FAIL|rror|Traceback|numerics|ok:|^{"; }
echo "+ p2p-overlap"
OUT=$OUT timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 scripts/p2p-overlap.py 2>&1 | quiet
b() { echo "+ shardwise bench $*"; timeout 200 python3 -m shardwise bench --dtype bf16 "$@" 2>&1 | quiet; }
T="--trace $OUT/traces --out $OUT/trace.jsonl"
b --preset small-l2 --iters 5 --warmup 2 --nproc 2 --plan tp_pp:2x1 --plan layerwise:cap=L2 $T
b --preset seed-helix-4l --phase decode --batch 16 --seq 4096 --iters 10 --warmup 3 \
  --plan tp_pp:1x1 --plan tp_pp:2x1 --plan ring:2 $T
b --preset seed-moe-16l --layers 2 --batch 8 --seq 2048 --phase decode --iters 3 --warmup 2 --plan ep:2 $T
for C in default 8 16; do
  if [ $C = default ]; then unset NCCL_MAX_CTAS; else export NCCL_MAX_CTAS=$C; fi
  echo "NCCL_MAX_CTAS=$C"
  b --preset seed-helix-4l --phase prefill --batch 8 --seq 8192 --iters 5 --warmup 2 \
    --plan tp_pp:2x1 --out "$OUT/ctas-$C.jsonl"
done
unset NCCL_MAX_CTAS
echo "+ shardwise run seed-moe-16l --layers 1"
timeout 300 python3 -m shardwise run --device cuda --dtype bf16 --json "$OUT/verify-moe-1l.jsonl" \
  --preset seed-moe-16l --layers 1 --nproc 2 --batch 4 --seq 1024 --steps 4 \
  --plan ep:2 --plan tp_pp:2x1 2>&1 | quiet
ls -la "$OUT"
