#!/usr/bin/env bash
# L2 prefetch of the next weight during a decode step's all-reduces, and
# per-rank profiles of the 1- and 2-GPU prefill (seed-helix-4l, 8 x 8192).
# Usage: OUT=results/diag bash scripts/gpu-diag-6.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results/diag}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "+ l2-prefetch"
timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 scripts/l2-prefetch.py 2>&1 | grep -E "^\{|rror"
echo "+ bench --trace prefill"
timeout 300 python3 -m shardwise bench --dtype bf16 --preset seed-helix-4l --phase prefill --batch 8 --seq 8192 \
  --iters 3 --warmup 1 --plan tp_pp:1x1 --plan tp_pp:2x1 --trace "$OUT/traces" --out "$OUT/trace.jsonl" 2>&1 \
  | grep -E "FAIL|rror|ok:"
tar czf "$OUT/traces.tgz" -C "$OUT" $(cd "$OUT" && ls -d traces/*.txt)
rm -rf "$OUT/traces"
