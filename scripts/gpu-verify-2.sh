#!/usr/bin/env bash
# Numerics of every strategy on the seed presets' dimensions (reduced batch and
# sequence, bf16) on a machine with 2 GPUs, plus the GPU-only unit tests.
# Usage: OUT=results bash scripts/gpu-verify-2.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
J="$OUT/verify-h200x2.jsonl"
sw() { echo "+ shardwise $*"; python3 -m shardwise "$@" --device cuda --dtype bf16 --json "$J" 2>&1 | grep -v "^\[rank"; }
sw run --preset seed-helix-4l --nproc 2 --batch 4 --seq 2048 --steps 4 \
   --plan tp_pp:2x1 --plan tp_pp:1x2 --plan helix:2x1 --plan helix:1x2 --plan helix:1x2,reduce=flat
sw run --preset seed-ring-4l --nproc 2 --batch 2 --seq 2048 --steps 4 --plan ring:2 --plan tp_pp:2x1
sw run --preset seed-moe-16l --layers 2 --nproc 2 --batch 4 --seq 1024 --steps 4 --plan ep:2 --plan tp_pp:2x1
sw run --preset small-l2 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:1x2
sw run --preset seed-layerwise-30b --layers 4 --nproc 2 --batch 2 --seq 256 --steps 4 \
   --plan layerwise:cap=8GB --plan tp_pp:2x1
echo "+ pytest -m gpu"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lse.py 2>&1 | tail -5
