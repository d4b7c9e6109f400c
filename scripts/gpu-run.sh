#!/usr/bin/env bash
# One GPU machine's sweeps, by name, in one call:
#   OUT=DIR bash scripts/gpu-run.sh SWEEP [SWEEP ...]      (from the repository root)
# Sweeps:
#   real     llama-3.1-8b (4 layers) and mixtral-8x7b (2 layers), bf16: tp_pp:1x1
#            beside the torch_eager and hf peers, prefill at 4 x 6000 and 1 x 2048,
#            decode (CUDA graphs where supported) at 1 x 2048 and 16 x 4096 -> real.jsonl
#   verify   every strategy that runs on the GPUs here on both models (2 layers,
#            2 x 1100 tokens), eager and static decode -> verify-real.jsonl
#   tests    pytest -m gpu -> gpu-tests.txt
# A plan whose bench fails is retried alone, so one failure loses no other record.
set -uo pipefail
OUT=${OUT:-results}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
sw() { timeout "${LIMIT:-180}" python3 -m shardwise "$@"; }

bench_all() {  # bench_all OUTFILE ARGS... -- PLAN...: every plan in one job, or each alone
  local out=$1; shift
  local args=() plans=() part="$OUT/.part.jsonl"
  while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  for p in "$@"; do plans+=(--plan "$p"); done
  rm -f "$part"
  echo "+ shardwise bench ${args[*]} ${plans[*]}"
  sw bench --out "$part" "${args[@]}" "${plans[@]}" 2>&1 | tail -12
  for p in "$@"; do
    grep -q "\"plan\": \"$p\"" "$part" 2>/dev/null && continue
    echo "+ (alone) shardwise bench ${args[*]} --plan $p"
    sw bench --out "$part" "${args[@]}" --plan "$p" 2>&1 | tail -6
  done
  cat "$part" >> "$out" 2>/dev/null; rm -f "$part"
}

for sweep in "$@"; do
  case $sweep in
    real)
      for m in "llama-3.1-8b --layers 4" "mixtral-8x7b --layers 2"; do
        for w in "prefill 4 6000 5 2" "prefill 1 2048 10 3" "decode 1 2048 30 5" "decode 16 4096 30 5"; do
          set -- $w
          bench_all "$OUT/real.jsonl" --model $m --dtype bf16 --phase $1 --batch $2 --seq $3 \
            --iters $4 --warmup $5 -- tp_pp:1x1 torch_eager:1 hf:1
        done
      done ;;
    verify)
      n=$(python3 -c "import torch; print(torch.cuda.device_count())")
      for m in "llama-3.1-8b" "mixtral-8x7b"; do
        plans="--plan tp_pp:1x1 --plan helix:1x1 --plan ring:1 --plan layerwise:cap=HBM"
        [ "$m" = mixtral-8x7b ] && plans="$plans --plan ep:1"
        for s in "" "--static-decode"; do
          echo "+ shardwise run --model $m --layers 2 $plans $s"
          sw run --model $m --layers 2 --dtype bf16 --device cuda --nproc 1 --batch 2 --seq 1100 \
            $plans $s --json "$OUT/verify-real.jsonl" 2>&1 | tail -14
        done
      done ;;
    tests)
      LIMIT=300 timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -20 | tee "$OUT/gpu-tests.txt" ;;
    *) echo "unknown sweep $sweep (real, verify, tests)"; exit 2 ;;
  esac
done
