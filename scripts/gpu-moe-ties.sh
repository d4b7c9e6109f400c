#!/usr/bin/env bash
# MoE numerics in bf16 on 2 GPUs with the near-tie report: how many tokens'
# top-2 choice is undetermined at bf16 precision, and the error over the rest.
# Usage: OUT=results bash scripts/gpu-moe-ties.sh   (from the repository root)
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for L in 2 4; do
  echo "+ shardwise run --preset seed-moe-16l --layers $L ..."
  timeout 300 python3 -m shardwise run --device cuda --preset seed-moe-16l --layers $L --nproc 2 --batch 4 \
     --seq 1024 --steps 4 --dtype bf16 --plan ep:2 --plan tp_pp:2x1 \
     --json "$OUT/verify-h200x2-moe.jsonl" 2>&1 | grep -E "ok:|FAILED"
done
python3 - "$OUT/verify-h200x2-moe.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "moe_near_tie_tokens" in r:
        print(r["plan"], r["n_layers"] if "n_layers" in r else r["model"], "max err %.2e" % r["max_rel_err"],
              "near-tied prompt tokens", r["moe_near_tie_tokens"][0], "of", r["batch"] * r["seq_len"],
              "determinate err %.2e" % r["max_determinate_rel_err"])
PY
