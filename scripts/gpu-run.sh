#!/usr/bin/env bash
# One GPU machine's sweeps, by name, in one call:
#   SHARDWISE_GIT_REV=REV OUT=DIR bash scripts/gpu-run.sh SWEEP [SWEEP ...]
# from the repository root. Records are written under results/gpu/ (relative,
# so the commands they record can be rerun as they are) and copied to OUT;
# REV names the commit the tree was sent at, where the copy has no history.
# Sweeps:
#   real     llama-3.1-8b (4 layers) and mixtral-8x7b (2 layers), bf16: tp_pp:1x1
#            beside the torch_eager and hf peers, prefill at 4 x 6000 and 1 x 2048,
#            decode (CUDA graphs where supported) at 1 x 2048 and 16 x 4096, one
#            file per model and workload -> real-*.jsonl
#   verify   every strategy that runs on the GPUs here on both models (2 layers,
#            2 x 1100 tokens), eager and static decode -> verify-real.jsonl
#   tests    pytest -m gpu -> gpu-tests.txt
#   calibrate  shardwise calibrate on this machine -> profile-NAME.json (NAME: h100-x1,
#            h200-x1, ... from the GPU and its count); held-out predictions on it
#            (scripts/heldout.py predict) -> heldout-predictions.jsonl
#   heldout  the bench commands of scripts/heldout.py, whose predictions must be
#            committed first (results/predictions/heldout.jsonl) -> heldout-*.jsonl
# A plan whose bench fails is retried alone, so one failure loses no other record.
set -uo pipefail
OUT=${OUT:-results/gpu}
R=results/gpu
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$R"
trap '[ "$OUT" != "$R" ] && cp "$R"/* "$OUT"/ 2>/dev/null' EXIT
sw() { timeout "${LIMIT:-180}" python3 -m shardwise "$@"; }

bench_all() {  # bench_all OUTFILE ARGS... -- PLAN...: every plan in one job, or each alone
  local out=$1; shift
  local args=() plans=()
  while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  for p in "$@"; do plans+=(--plan "$p"); done
  echo "+ shardwise bench --out $out ${args[*]} ${plans[*]}"
  sw bench --out "$out" "${args[@]}" "${plans[@]}" 2>&1 | tail -12
  for p in "$@"; do
    grep -q "\"plan\": \"$p\"" "$out" 2>/dev/null && continue
    echo "+ (alone) shardwise bench --out $out ${args[*]} --plan $p"
    sw bench --out "$out" "${args[@]}" --plan "$p" 2>&1 | tail -6
  done
}

for sweep in "$@"; do
  case $sweep in
    real)
      for m in "llama-3.1-8b --layers 4" "mixtral-8x7b --layers 2"; do
        for w in "prefill 4 6000 5 2" "prefill 1 2048 10 3" "decode 1 2048 30 5" "decode 16 4096 30 5"; do
          set -- $w
          bench_all "$R/real-${m%% *}-$1-$2x$3.jsonl" --model $m --dtype bf16 --phase $1 --batch $2 --seq $3 \
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
            $plans $s --json "$R/verify-real.jsonl" 2>&1 | tail -14
        done
      done ;;
    calibrate)
      n=$(python3 -c "import torch; print(torch.cuda.device_count())")
      gpu=$(python3 -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name() else 'h100')")
      name=$gpu-x$n
      echo "+ shardwise calibrate --out results/profiles/$name.json --name $name"
      mkdir -p results/profiles
      LIMIT=420 sw calibrate --out "results/profiles/$name.json" --name "$name" 2>&1 | tail -20
      cp "results/profiles/$name.json" "$R/profile-$name.json" || exit 1
      echo "+ python scripts/heldout.py predict --profile results/profiles/$name.json --out results/predictions/heldout.jsonl"
      python3 scripts/heldout.py predict --profile "results/profiles/$name.json" \
        --out "$R/heldout-predictions.jsonl" 2>&1 | tail -45 ;;
    heldout)
      test -s results/predictions/heldout.jsonl || { echo "commit results/predictions/heldout.jsonl first"; exit 2; }
      mkdir -p results/heldout
      python3 scripts/heldout.py commands | while read -r line; do
        echo "+ $line"
        LIMIT=240 sw ${line#shardwise } </dev/null 2>&1 | tail -9
      done
      cp results/heldout/*.jsonl "$R"/ ;;
    tests)
      LIMIT=300 timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -20 | tee "$R/gpu-tests.txt" ;;
    *) echo "unknown sweep $sweep (real, verify, tests, calibrate, heldout)"; exit 2 ;;
  esac
done
