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
#            file per model and workload -> real-*.jsonl (REAL_MODELS: "NAME --layers N", comma
#            separated, for fewer)
#   verify   every strategy that runs on the GPUs here on both models (2 layers,
#            2 x 1100 tokens), eager and static decode -> verify-real.jsonl
#   tests    pytest -m gpu -> gpu-tests.txt
#   kernels  the profiler's kernels per decode layer: every plan that runs on one GPU, both
#            models at 1 and 2 layers, batch 16 x 512, one CUDA graph replay profiled (bench
#            --trace) -> kernels-profiled.jsonl; then scripts/kernel-counts.py --profiled on
#            it -> kernels-per-decode-layer.md, .jsonl (the CPU count beside the profiler's)
#   calibrate  shardwise calibrate on this machine -> profile-NAME.json (NAME: h100-x1,
#            h200-x1, ... from the GPU and its count); held-out predictions on it
#            (scripts/heldout.py predict, round ROUND, default 2) -> heldout-predictions.jsonl
#   heldout  the bench commands of scripts/heldout.py's round ROUND, whose predictions must
#            be committed first (results/predictions/heldout.jsonl for round 1,
#            roundN-PROFILE.jsonl after) -> heldout-*.jsonl, roundN-*.jsonl
#   ab       one change against the code without it, in one call: AB_SED (a sed script)
#            applied to a copy of src/ (or of AB_BASE, another revision's src/ written out
#            with `git archive REV src | tar -x -C DIR`, named AB_BASE_REV in its records)
#            is the side without it; each of AB_CASES (bench
#            arguments, ";" between cases) runs with, without, with, without
#            -> ab-with.jsonl, ab-without.jsonl
# The 2-GPU sweeps (NAME as above; fidelity-*.txt where results/profiles/NAME.json
# exists, e.g. from calibrate earlier in the same call):
#   verify2  every strategy against the reference on the seed presets' dimensions
#            (reduced), eager decode; seed-moe-16l at 1, 2 and 4 layers -> verify-NAME.jsonl
#   static2  the static-shape decode steps that bench replays in CUDA graphs, every
#            2-GPU plan on seed-helix-4l, seed-ring-4l and seed-moe-16l (1 layer)
#            -> verify-static-NAME.jsonl
#   bench2   every plan and the PyTorch peers on seed-helix-4l (prefill 8 x 8192,
#            decode 16 x 4096), small-l2, seed-moe-16l and seed-layerwise-30b (4 layers),
#            ring against tp_pp and torch_cp at 4K-32K tokens -> bench-NAME-*.jsonl,
#            fidelity-NAME.txt
#   repeats  what moves from run to run, three times over: the 1-GPU prefill (tp_pp:1x1,
#            torch_eager:1; MFU) and small-l2's host-bound steps -> repeats-*.jsonl,
#            fidelity-repeats-NAME.txt
#   diag-prefill  profiles of the 1- and 2-GPU prefill (bench --trace), tp_pp:2x1 in 2, 4
#            and 8 chunks, under NCCL_MAX_CTAS 8 and 16, and GEMMs beside an all-reduce or
#            a peer pull (scripts/p2p-overlap.py) -> trace-prefill.jsonl, traces-prefill.tgz,
#            chunks.jsonl, ctas-*.jsonl, p2p-overlap.json
#   diag-decode  profiles of graph decode steps as bench times them (seed-helix-4l on 1
#            and 2 GPUs, small-l2), an L2 prefetch beside the all-reduces
#            (scripts/l2-prefetch.py) and decode GEMMs, cuBLAS against Triton
#            (scripts/skinny-gemm.py) -> trace-decode*.jsonl, traces-decode.tgz,
#            l2-prefetch.json, skinny-gemm.json
#   diag-real  profiles of the real models' graph decode steps (tp_pp:1x1; llama-3.1-8b 4
#            layers and mixtral-8x7b 2 layers at 1 x 2048 and 16 x 4096, bench --trace) and of
#            mixtral's 1 x 2048 prompt, the
#            routed-expert kernel's launches and the decode attention's, each timed in CUDA
#            graphs (scripts/moe-rows.py, scripts/decode-attn.py --sweep) -> trace-real.jsonl,
#            traces-real.tgz, moe-rows.jsonl, decode-attn.jsonl
#   clocks   llama-3.1-8b (4 layers) decode at 16 x 4096 and 1 x 2048, 100 graph replays each
#            (tp_pp:1x1, torch_eager:1), with nvidia-smi sampling the SM and memory clocks,
#            power, temperature and throttle reasons every 20 ms beside it -> clocks-*.jsonl,
#            clocks-smi.csv (each bench's start and end time in clocks-marks.txt)
#   plan-cpu  `shardwise plan` for llama-3.1-70b on h100-sxm-16 on this machine's CPUs, with
#            an empty cache of recordings, then again with what the first wrote
#            -> plan-cpu.jsonl (seconds, CPUs), plan-cpu-cold.txt, plan-cpu-warm.txt
# On 4 or 8 GPUs:
#   sweep    each seed preset at its own dimensions, its baseline scaled to the GPUs here
#            and the proposed plans, at the workload scripts/sweep-workloads.py picks on
#            results/profiles/NAME.json (run calibrate first) -> sweep-NAME.txt,
#            bench-NAME-*.jsonl, fidelity-NAME.txt
# A plan whose bench fails is retried alone, so one failure loses no other record.
set -uo pipefail
OUT=${OUT:-results/gpu}
R=results/gpu
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$R"
trap '[ "$OUT" != "$R" ] && cp "$R"/* "$OUT"/ 2>/dev/null' EXIT
ROUND=${ROUND:-2}
# Round 1's predictions came from the calibrate sweep; round 2's from the packaged
# profiles (h100-x1, h200-x2), one file each, committed before any measurement.
PRED=$([ "$ROUND" = 1 ] && echo results/predictions/heldout.jsonl || ls results/predictions/round"$ROUND"-*.jsonl 2>/dev/null | head -1)
sw() { timeout "${LIMIT:-180}" python3 -m shardwise "$@"; }

machine() {  # N (GPUs here) and NAME (h200-x2, ...), as calibrate names its profile
  N=$(python3 -c "import torch; print(torch.cuda.device_count())")
  NAME=$(python3 -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name() else 'h100')")-x$N
}

need() {  # need MIN: whether this machine has the GPUs the sweep needs
  [ "$N" -ge "$1" ] && return 0
  echo "sweep $sweep needs $1 or more GPUs; this machine has $N (skipped)"; return 1
}

fidelity() {  # fidelity OUTFILE RECORDS...: each record against the profile of this machine
  local out=$1; shift
  local p=results/profiles/$NAME.json
  [ -s "$p" ] || { echo "no $p: run the calibrate sweep first for $out"; return 0; }
  echo "shardwise report --fidelity $* --profile $p" > "$out"
  COLUMNS=160 sw report --fidelity "$@" --profile "$p" >> "$out" 2>&1
  tail -15 "$out"
}

pack() {  # pack DIR: its trace tables (not the Chrome traces) as DIR.tgz, which OUT receives
  tar -C "$(dirname "$1")" --exclude "*.json" -czf "$1.tgz" "$(basename "$1")" && rm -rf "$1"
}

dist2() {  # dist2 SCRIPT: a 2-process diagnostic script (writes under $OUT=results/gpu)
  echo "+ python -m torch.distributed.run --nproc-per-node 2 $1"
  OUT=$R timeout 180 python3 -m torch.distributed.run --nproc-per-node 2 "$1" 2>&1 | grep -E "^\{|rror"
}

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
      models=("llama-3.1-8b --layers 4" "mixtral-8x7b --layers 2")
      [ -n "${REAL_MODELS:-}" ] && IFS=, read -ra models <<< "$REAL_MODELS"  # e.g. "mixtral-8x7b --layers 2"
      for m in "${models[@]}"; do
        for w in "prefill 4 6000 5 2" "prefill 1 2048 10 3" "decode 1 2048 30 5" "decode 16 4096 30 5"; do
          set -- $w
          bench_all "$R/real-${m%% *}-$1-$2x$3.jsonl" --model $m --dtype bf16 --phase $1 --batch $2 --seq $3 \
            --iters $4 --warmup $5 -- tp_pp:1x1 torch_eager:1 hf:1
        done
      done ;;
    ab)
      [ -n "${AB_SED:-}${AB_BASE:-}" ] && [ -n "${AB_CASES:-}" ] || { echo "ab needs AB_SED or AB_BASE, and AB_CASES"; exit 2; }
      rm -rf /tmp/ab-src && cp -r "${AB_BASE:-src}" /tmp/ab-src
      [ -n "${AB_SED:-}" ] && find /tmp/ab-src -name "*.py" -exec sed -i "$AB_SED" {} +
      diff -r src /tmp/ab-src | grep "^[<>]" | head -20
      IFS=';' read -ra cases <<< "$AB_CASES"
      for c in "${cases[@]}"; do
        for side in with without with without; do
          src=$PWD/src rev=${SHARDWISE_GIT_REV:-}
          # the side without the change names its revision as patched
          [ $side = without ] && src=/tmp/ab-src rev=${AB_BASE_REV:-"${rev:-$(git rev-parse --short HEAD 2>/dev/null)}+AB_SED"}
          echo "+ ($side) shardwise bench --out $R/ab-$side.jsonl $c"
          PYTHONPATH=$src SHARDWISE_GIT_REV=$rev sw bench --out "$R/ab-$side.jsonl" $c 2>&1 | tail -4
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
      echo "+ python scripts/heldout.py --round $ROUND predict --profile results/profiles/$name.json"
      python3 scripts/heldout.py --round "$ROUND" predict --profile "results/profiles/$name.json" \
        --out "$R/heldout-predictions.jsonl" 2>&1 | tail -45 ;;
    heldout)
      test -s "$PRED" || { echo "commit the round's predictions (results/predictions/) first"; exit 2; }
      mkdir -p results/heldout
      python3 scripts/heldout.py --round "$ROUND" commands | while read -r line; do
        echo "+ $line"
        LIMIT=240 sw ${line#shardwise } </dev/null 2>&1 | tail -9
      done
      cp results/heldout/*.jsonl "$R"/ ;;
    kernels)
      for m in llama-3.1-8b mixtral-8x7b; do
        plans="--plan tp_pp:1x1 --plan helix:1x1 --plan ring:1 --plan layerwise:cap=HBM"
        [ $m = mixtral-8x7b ] && plans="$plans --plan ep:1"
        for L in 1 2; do
          echo "+ shardwise bench --model $m --layers $L --phase decode --batch 16 --seq 512 --trace $R/traces-kernels $plans"
          sw bench --model $m --layers $L --dtype bf16 --phase decode --batch 16 --seq 512 --iters 5 \
            --warmup 2 --trace "$R/traces-kernels" $plans --out "$R/kernels-profiled.jsonl" 2>&1 | tail -8
        done
      done
      rm -rf "$R/traces-kernels"
      python3 scripts/kernel-counts.py --out "$R/kernels-per-decode-layer" \
        --profiled "$R/kernels-profiled.jsonl" | tail -3 ;;
    tests)
      echo "# python3 -m pytest -q -m gpu tests at ${SHARDWISE_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null)}" \
        "on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); the tail of its output" > "$R/gpu-tests.txt"
      LIMIT=300 timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -20 | tee -a "$R/gpu-tests.txt" ;;
    verify2)
      machine; need 2 || continue
      v() { echo "+ shardwise run $*"; LIMIT=300 sw run --device cuda --dtype bf16 --json "$R/verify-$NAME.jsonl" "$@" 2>&1 | tail -14; }
      v --preset seed-helix-4l --nproc 2 --batch 4 --seq 2048 --steps 4 \
        --plan tp_pp:2x1 --plan tp_pp:1x2 --plan helix:2x1 --plan helix:1x2 --plan helix:1x2,reduce=flat
      v --preset seed-ring-4l --nproc 2 --batch 2 --seq 2048 --steps 4 --plan ring:2 --plan tp_pp:2x1
      for L in 1 2 4; do
        v --preset seed-moe-16l --layers $L --nproc 2 --batch 4 --seq 1024 --steps 4 \
          --plan ep:2 --plan tp_pp:2x1 --plan tp_pp:2x1,reduce=model
      done
      v --preset small-l2 --nproc 2 --plan layerwise:cap=L2 --plan tp_pp:1x2
      v --preset seed-layerwise-30b --layers 4 --nproc 2 --batch 2 --seq 256 --steps 4 \
        --plan layerwise:cap=8GB --plan tp_pp:2x1 ;;
    static2)
      machine; need 2 || continue
      for args in "--preset seed-helix-4l --batch 4 --seq 2048 --plan ring:2" \
                  "--preset seed-helix-4l --batch 4 --seq 2048 --plan tp_pp:2x1" \
                  "--preset seed-helix-4l --batch 4 --seq 2048 --plan helix:2x1" \
                  "--preset seed-helix-4l --batch 4 --seq 2048 --nproc 2 --plan layerwise:cap=HBM" \
                  "--preset seed-ring-4l --batch 2 --seq 2048 --plan ring:2" \
                  "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan ep:2" \
                  "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan tp_pp:2x1" \
                  "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan helix:2x1" \
                  "--preset seed-moe-16l --layers 1 --batch 4 --seq 1024 --plan ring:2"; do
        echo "+ shardwise verify --static-decode $args"
        LIMIT=200 sw verify --device cuda --dtype bf16 --static-decode --steps 4 \
          --json "$R/verify-static-$NAME.jsonl" $args 2>&1 | tail -4
      done ;;
    bench2)
      machine; need 2 || continue
      B=$R/bench-$NAME H="--dtype bf16 --preset seed-helix-4l"
      LIMIT=300 bench_all "$B-prefill.jsonl" $H --phase prefill --batch 8 --seq 8192 --iters 5 --warmup 2 -- \
        torch_eager:1 tp_pp:1x1 torch_tp:2 tp_pp:2x1 tp_pp:2x1,overlap=4 helix:1x2 helix:2x1 tp_pp:1x2,mb=4 \
        ring:2 torch_cp:2 layerwise:cap=HBM
      LIMIT=300 bench_all "$B-decode.jsonl" $H --phase decode --batch 16 --seq 4096 --iters 30 --warmup 5 -- \
        torch_eager:1 tp_pp:1x1 torch_tp:2 tp_pp:2x1 tp_pp:2x1,overlap=4 helix:1x2 helix:2x1 tp_pp:1x2 \
        ring:2 layerwise:cap=HBM
      bench_all "$B-small-l2.jsonl" --dtype bf16 --preset small-l2 --iters 50 --warmup 10 --nproc 2 -- \
        layerwise:cap=L2 tp_pp:2x1
      bench_all "$B-moe.jsonl" --dtype bf16 --preset seed-moe-16l --layers 4 --batch 8 --seq 2048 --iters 5 \
        --warmup 2 -- ep:2 tp_pp:2x1
      bench_all "$B-layerwise-30b.jsonl" --dtype bf16 --preset seed-layerwise-30b --layers 4 --batch 4 --seq 2048 \
        --iters 5 --warmup 2 --nproc 2 -- layerwise:cap=16GB tp_pp:2x1 tp_pp:1x2,mb=4
      for L in 4096 16384 32768; do
        bench_all "$B-ring-$L.jsonl" --dtype bf16 --preset seed-ring-4l --layers 1 --phase prefill --batch 1 \
          --seq $L --iters 3 --warmup 1 -- ring:2 tp_pp:2x1 torch_cp:2
      done
      fidelity "$R/fidelity-$NAME.txt" "$B"-*.jsonl ;;
    repeats)
      machine; need 2 || continue
      for i in 1 2 3; do
        LIMIT=300 bench_all "$R/repeats-prefill-$i.jsonl" --dtype bf16 --preset seed-helix-4l --phase prefill \
          --batch 8 --seq 8192 --iters 5 --warmup 2 -- torch_eager:1 tp_pp:1x1
        bench_all "$R/repeats-small-l2-$i.jsonl" --dtype bf16 --preset small-l2 --iters 50 --warmup 10 \
          --nproc 2 -- layerwise:cap=L2 tp_pp:2x1
      done
      fidelity "$R/fidelity-repeats-$NAME.txt" "$R"/repeats-small-l2-*.jsonl ;;
    diag-prefill)
      machine; need 2 || continue
      P="--dtype bf16 --preset seed-helix-4l --phase prefill --batch 8 --seq 8192"
      LIMIT=300 bench_all "$R/trace-prefill.jsonl" $P --iters 3 --warmup 1 --trace "$R/traces-prefill" -- \
        tp_pp:1x1 tp_pp:2x1
      pack "$R/traces-prefill"
      LIMIT=300 bench_all "$R/chunks.jsonl" $P --iters 5 --warmup 2 -- \
        tp_pp:1x1 tp_pp:2x1,overlap=2 tp_pp:2x1,overlap=4 tp_pp:2x1,overlap=8
      for c in 8 16; do  # overlap=2, the default, under NCCL's default CTA count is in chunks.jsonl
        echo "NCCL_MAX_CTAS=$c"
        NCCL_MAX_CTAS=$c LIMIT=300 bench_all "$R/ctas-$c.jsonl" $P --iters 5 --warmup 2 -- tp_pp:2x1
      done
      dist2 scripts/p2p-overlap.py ;;
    diag-decode)
      machine; need 2 || continue
      T=$R/traces-decode
      bench_all "$R/trace-decode.jsonl" --dtype bf16 --preset seed-helix-4l --phase decode --batch 16 --seq 4096 \
        --iters 30 --warmup 5 --trace "$T" -- tp_pp:1x1 tp_pp:2x1 helix:1x2 helix:2x1 ring:2 layerwise:cap=HBM
      bench_all "$R/trace-decode-small-l2.jsonl" --dtype bf16 --preset small-l2 --phase decode --iters 50 \
        --warmup 10 --nproc 2 --trace "$T" -- layerwise:cap=L2 tp_pp:1x1 tp_pp:2x1
      pack "$T"
      dist2 scripts/l2-prefetch.py
      echo "+ python scripts/skinny-gemm.py"
      OUT=$R timeout 240 python3 scripts/skinny-gemm.py 2>&1 | grep -E "^\{|rror" ;;
    diag-real)
      T=$R/traces-real
      for m in "llama-3.1-8b --layers 4" "mixtral-8x7b --layers 2"; do
        for w in "1 2048" "16 4096"; do
          set -- $w
          bench_all "$R/trace-real.jsonl" --model $m --dtype bf16 --phase decode --batch $1 --seq $2 \
            --iters 30 --warmup 5 --trace "$T" -- tp_pp:1x1
        done
      done
      bench_all "$R/trace-real.jsonl" --model mixtral-8x7b --layers 2 --dtype bf16 --phase prefill \
        --batch 1 --seq 2048 --iters 10 --warmup 3 --trace "$T" -- tp_pp:1x1
      pack "$T"
      for probe in moe-rows decode-attn; do
        echo "+ python scripts/$probe.py --sweep --out $R/$probe.jsonl"
        timeout 240 python3 "scripts/$probe.py" --sweep --out "$R/$probe.jsonl" 2>&1 | tail -15
      done ;;
    clocks)
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv -lms 20 > "$R/clocks-smi.csv" 2>&1 &
      smi=$!
      echo "# gpu-run.sh clocks at ${SHARDWISE_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null)}" \
        "on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): bench tp_pp:1x1 and" \
        "torch_eager:1, start and end of each workload" >> "$R/clocks-marks.txt"
      for w in "16 4096" "1 2048"; do
        set -- $w
        echo "start $1x$2 $(date +%H:%M:%S.%N)" >> "$R/clocks-marks.txt"
        bench_all "$R/clocks-$1x$2.jsonl" --model llama-3.1-8b --layers 4 --dtype bf16 --phase decode \
          --batch $1 --seq $2 --iters 100 --warmup 5 -- tp_pp:1x1 torch_eager:1
        echo "end $1x$2 $(date +%H:%M:%S.%N)" >> "$R/clocks-marks.txt"
      done
      kill $smi ;;
    plan-cpu)
      C=$(mktemp -d)
      args=(plan --model llama-3.1-70b --cluster h100-sxm-16 --batch 8 --seq 4096 --phase both --top 10)
      for run in cold warm; do
        echo "+ SHARDWISE_CACHE=($run) shardwise ${args[*]}"
        t0=$(date +%s.%N)
        SHARDWISE_CACHE=$C COLUMNS=160 sw "${args[@]}" > "$R/plan-cpu-$run.txt" 2>&1
        rc=$?
        t1=$(date +%s.%N)
        python3 - "$run" "$t0" "$t1" "$rc" "shardwise ${args[*]}" >> "$R/plan-cpu.jsonl" <<'PY'
import json, os, platform, sys
run, t0, t1, rc, cmd = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
ncpu = len(os.sched_getaffinity(0))
print(json.dumps({"command": cmd, "cache": run, "seconds": round(float(t1) - float(t0), 2),
                  "device": f"cpu: {ncpu} CPUs", "plan": "every candidate (shardwise plan)",
                  "exit": int(rc), "cpus": ncpu, "cpu": cpu,
                  "python": platform.python_version(), "git_rev": os.environ.get("SHARDWISE_GIT_REV")}))
PY
        tail -3 "$R/plan-cpu.jsonl" | tail -1
      done
      rm -rf "$C" ;;
    sweep)
      machine; need 4 || continue
      p=results/profiles/$NAME.json
      [ -s "$p" ] || { echo "no $p: run the calibrate sweep first (gpu-run.sh calibrate sweep)"; continue; }
      echo "+ python scripts/sweep-workloads.py --gpus $N --profile $p"
      python3 scripts/sweep-workloads.py --gpus "$N" --profile "$p" | tee "$R/sweep-$NAME.txt"
      while read -r preset batch seq plans; do
        LIMIT=540 bench_all "$R/bench-$NAME-$preset.jsonl" --dtype bf16 --preset "$preset" --batch "$batch" \
          --seq "$seq" --iters 5 --warmup 2 --nproc "$N" -- $plans </dev/null
      done < <(grep -v '^#' "$R/sweep-$NAME.txt")
      fidelity "$R/fidelity-$NAME.txt" "$R/bench-$NAME"-*.jsonl ;;
    *) echo "unknown sweep $sweep (real, verify, tests, calibrate, heldout, verify2, static2, bench2, repeats,"\
         "diag-prefill, diag-decode, diag-real, clocks, plan-cpu, sweep)"; exit 2 ;;
  esac
done
