#!/usr/bin/env bash
# The 4/8-GPU sweep, run on the largest machine lent (nvidia-h200-x8, else
# -x4): calibrate the machine, pick each seed preset's workload with
# scripts/sweep-workloads.py on that profile, benchmark the baseline scaled
# to the machine and the proposed plans (prefill and decode), then compare
# every record with its prediction.
# Usage: OUT=results bash scripts/gpu-sweep-8.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
NAME="h200-x$N"
P="$OUT/$NAME.json" B="$OUT/bench-$NAME.jsonl"
echo "+ shardwise calibrate ($N GPUs)"
timeout 300 python3 -m shardwise calibrate --out "$P" --name "$NAME" 2>&1 | tail -4
python3 scripts/sweep-workloads.py --gpus "$N" --profile "$P" | tee "$OUT/sweep-$NAME.txt"
grep -v '^#' "$OUT/sweep-$NAME.txt" | while read -r preset batch seq plans; do
  args=()
  for p in $plans; do args+=(--plan "$p"); done
  echo "+ shardwise bench --preset $preset --batch $batch --seq $seq ${args[*]}"
  timeout 900 python3 -m shardwise bench --out "$B" --dtype bf16 --preset "$preset" --batch "$batch" \
    --seq "$seq" --iters 5 --warmup 2 --nproc "$N" "${args[@]}" 2>&1 | grep -E "ok:|FAIL|rror|median"
done
python3 -m shardwise report --fidelity "$B" --profile "$P" > "$OUT/fidelity-$NAME.txt" 2>&1
tail -15 "$OUT/fidelity-$NAME.txt"
