#!/usr/bin/env bash
# Two questions after the run at ad6beec:
# 1. How much does the 1-GPU prefill MFU move between back-to-back runs of
#    the same code? Three more benchmarks of tp_pp:1x1 and plain PyTorch
#    (seed-helix-4l, 8 x 8192), each measuring its own matmul peak.
# 2. Where does the time of the decode steps the cost model misses go?
#    Traces of small-l2's graph decode (layerwise replicas, tp_pp:1x1,
#    tp_pp:2x1) and of ring:2's decode on seed-helix-4l.
# Usage: OUT=results/diag bash scripts/gpu-diag-10.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
quiet() { grep -E "FAIL|rror|Traceback|numerics"; }
for i in 1 2 3; do
  echo "+ bench prefill, repeat $i"
  timeout 200 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase prefill --batch 8 \
    --seq 8192 --iters 5 --warmup 2 --plan torch_eager:1 --plan tp_pp:1x1 \
    --out "$OUT/mfu-repeats.jsonl" 2>&1 | quiet
done
echo "+ bench decode small-l2 with traces"
timeout 200 python3 -m shardwise bench --dtype bf16 --preset small-l2 --phase decode --iters 50 --warmup 10 \
  --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:1x1 --plan tp_pp:2x1 --trace "$OUT/traces-miss" \
  --out "$OUT/bench-miss.jsonl" 2>&1 | quiet
echo "+ bench decode ring:2 with traces"
timeout 200 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase decode --batch 16 --seq 4096 \
  --iters 30 --warmup 5 --plan ring:2 --plan tp_pp:1x1 --trace "$OUT/traces-miss" \
  --out "$OUT/bench-miss.jsonl" 2>&1 | quiet
tar -C "$OUT" --exclude "*.json" -czf "$OUT/traces-miss.tgz" traces-miss && rm -rf "$OUT/traces-miss"
