#!/usr/bin/env bash
# Rebuild docs/reproduce.md: for each seed, `shardwise reproduce` (its claims
# beside the predictions on h100-sxm-16) and the planner's ranking for the
# seed's own workload on h100-sxm-16 and h100-sxm-64; then `shardwise plan`
# for large models on 16 and 64 H100s.
#   bash scripts/reproduce-docs.sh          # the whole page
#   bash scripts/reproduce-docs.sh seeds    # only the seeds' sections (the plans section kept)
#   bash scripts/reproduce-docs.sh plans    # only the plans section (the seeds' sections kept)
# The page is written whole or not at all: a part is kept from the current
# page by its place (the plans section starts at its first `## ` heading that
# is not a seed's), and a page whose headings repeat is refused, not written.
# Commands run on the code of this tree (python -m shardwise with src/ first
# on the path), JOBS at once (default: the CPU count; JOBS=1 bash ... runs
# one at a time); each prints its time on standard error. A ranking records
# every rank of every candidate once and keeps the recordings on disk
# ($SHARDWISE_CACHE, perf/tracecache.py), so a rerun of unchanged code is
# faster than the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DOC=docs/reproduce.md
SW=(python -m shardwise)
TOP=10
JOBS=${JOBS:-$(nproc)}  # commands run at once
# The code the tables come from (a tree with changes not committed says so).
REV=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src 2> /dev/null || echo "+changes")
MEASURED=(--results results/bench-h200x2.jsonl --profile src/shardwise/perf/profiles/h200-x2.json)
# Layers each seed preset is ranked on, per cluster ("-": the whole model).
# A 64-GPU ranking prices several hundred plans of up to 64 ranks each, and
# more with each pipeline depth the layers allow. Every seed ranked whole at
# 960a8e0 (JOBS=1, nothing cached, on two cores shared with other work):
# on h100-sxm-16 each seed's reproduce took 19-306 s and each plan 4-18 s
# after it; on h100-sxm-64 seed-helix-2l took 127 s, seed-helix-4l 211,
# seed-ring-4l 1079, seed-layerwise-3b 275, seed-layerwise-30b 466 and
# seed-moe-16l 1515 (its expert-parallel plans cost the most): 78 minutes in all.
declare -A SEED_LAYERS64=(
  [seed-helix-2l]=- [seed-helix-4l]=- [seed-ring-4l]=-
  [seed-layerwise-3b]=- [seed-layerwise-30b]=- [seed-moe-16l]=-
)
# MODEL CLUSTER LAYERS: LAYERS "-" ranks the whole model, N its first N layers
# only. Every model here is ranked whole. With nothing cached, JOBS=2 on two
# cores shared with other work, the rankings took (s): llama-3.1-70b
# 77 on h100-sxm-16 and 436 on h100-sxm-64, llama-3.1-405b 81 and 624,
# mixtral-8x22b 201 and 636.
CASES=(
  "llama-3.1-70b h100-sxm-16 -"
  "llama-3.1-405b h100-sxm-16 -"
  "mixtral-8x22b h100-sxm-16 -"
  "llama-3.1-70b h100-sxm-64 -"
  "llama-3.1-405b h100-sxm-64 -"
  "mixtral-8x22b h100-sxm-64 -"
)
WORKLOAD=(--batch 8 --seq 4096 --phase both)

# The page is written in two passes: its text with a marker for each command's
# output (block), then the commands, JOBS at once (each ranking is one
# process on one core), and the markers replaced by what they printed.
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2> /dev/null || true; rm -rf "$OUT"' EXIT
trap 'exit 1' INT TERM HUP  # so that the EXIT trap ends the commands
BLOCKS=0

# `shardwise [--late] ARGS...` in a code block, at COLUMNS=160. --late: start
# it after the others (a seed's plan on h100-sxm-16 reads the recordings its
# reproduce writes).
block() {
  local queue=first
  if [ "$1" = --late ]; then queue=late; shift; fi
  BLOCKS=$((BLOCKS + 1))
  printf '%s\0' "$@" > "$OUT/$BLOCKS.args"
  echo "$BLOCKS" >> "$OUT/$queue"
  echo '```'; echo "@@block $BLOCKS@@"; echo '```'
}

run_one() {  # N: block N's command; its output in $OUT/N, its status in $OUT/N.rc
  local args rc=0 t0=$SECONDS
  mapfile -d '' -t args < "$OUT/$1.args"
  COLUMNS=160 "${SW[@]}" "${args[@]}" > "$OUT/$1" 2>&1 < /dev/null &
  local pid=$!
  trap 'kill "$pid" 2> /dev/null; exit 1' TERM  # the EXIT trap ends this job
  wait "$pid" || rc=$?
  echo "$rc" > "$OUT/$1.rc"
  echo "reproduce-docs: shardwise ${args[*]}: $((SECONDS - t0)) s$([ "$rc" = 0 ] ||
    echo ", exit status $rc")" >&2
}

run_blocks() {  # every block, JOBS at once; refused if one fails
  local n failed=()
  for n in $(cat "$OUT/first" "$OUT/late" 2> /dev/null || true); do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run_one "$n" &
  done
  wait
  for n in $(seq "$BLOCKS"); do
    [ "$(cat "$OUT/$n.rc")" = 0 ] || failed+=("$n")
  done
  for n in "${failed[@]}"; do
    mapfile -d '' -t args < "$OUT/$n.args"
    echo "reproduce-docs: shardwise ${args[*]} failed:" >&2
    tail -n 20 "$OUT/$n" >&2
  done
  [ ${#failed[@]} = 0 ] || refuse "${#failed[@]} command(s) failed (above)"
}

# The heading of a ranking: "### WHAT on CLUSTER", "(first N layers)" where cut.
heading() {  # WHAT CLUSTER LAYERS
  if [ "$3" = - ]; then echo "### $1 on $2"; else echo "### $1 on $2 (first $3 layers)"; fi
}

layers_flag() {  # LAYERS -> the --layers flag, or nothing for "-"
  [ "$1" = - ] || echo "--layers $1"
}

# "ID PRESET..." for each seed, as reproduce.py lists them.
seed_list() {
  python -c "from shardwise.perf.reproduce import SEEDS
for s in SEEDS.values(): print(s.doc.split('_')[0], *s.presets)"
}

seeds() {
  echo "# The seed experiments, reproduced"
  echo
  echo "Each seed's section starts with the output of \`shardwise reproduce SEED ${MEASURED[*]}\`: the seed's claimed figures beside the cost model's prediction for the exact seed workload on \`h100-sxm-16\` (two nodes of 8 H100 SXM, the seeds' setting), each plan at its fastest micro-batching that fits, the planner's best plan, the seed's own inconsistencies, and what the 2x H200 machine measured on reduced workloads. Then, for each preset of the seed, the best $TOP rows of the planner's ranking for the seed's own workload (\`shardwise plan --model PRESET --cluster CLUSTER --phase both --top $TOP\`: every plan and composition on all the cluster's GPUs, ranked by prefill plus decode time) on \`h100-sxm-16\` and on \`h100-sxm-64\` (eight nodes of 8 H100). Where a heading names a layer count the preset was ranked on its first layers only (\`--layers N\`), for the time a 64-GPU ranking takes on the two CPU cores that wrote this page: its figures are those of those layers, and no plan has more pipeline stages than it has layers. All output is printed at COLUMNS=160, by the code at revision $REV. Regenerate with \`bash scripts/reproduce-docs.sh\` (the whole page) or \`bash scripts/reproduce-docs.sh seeds\` (these sections only)."
  local rows s presets preset
  rows=$(seed_list)
  while read -r s presets; do
    echo; echo "## Seed $s"; echo
    block reproduce "$s" "${MEASURED[@]}"
    for preset in $presets; do
      echo; heading "$preset" h100-sxm-16 -; echo
      block --late plan --model "$preset" --cluster h100-sxm-16 --phase both --top "$TOP"
      local layers=${SEED_LAYERS64[$preset]}
      echo; heading "$preset" h100-sxm-64 "$layers"; echo
      # shellcheck disable=SC2046  # layers_flag prints nothing or two words
      block plan --model "$preset" $(layers_flag "$layers") --cluster h100-sxm-64 --phase both \
        --top "$TOP"
    done
  done <<< "$rows"
}

plans() {
  echo "## Plans for large models on 16 and 64 H100"
  echo
  echo "Each table is the best $TOP rows of \`shardwise plan --model MODEL --cluster CLUSTER ${WORKLOAD[*]} --top $TOP\` (COLUMNS=160): every plan and composition on all the cluster's GPUs, ranked by prefill plus decode time, for a serving workload of 8 sequences of 4096 tokens. \`h100-sxm-16\` is two nodes of 8 H100, \`h100-sxm-64\` eight; both are derived from one calibrated H100 and cited NVLink and InfiniBand figures (docs/costmodel.md, Profiles). Where the heading names a layer count, the model was ranked on its first layers only (\`--layers N\`), for the time a ranking takes on the two CPU cores that wrote this page: a cut model's figures are those of its first layers, and no plan has more pipeline stages than it has layers. Computed by the code at revision $REV. Regenerate with \`bash scripts/reproduce-docs.sh plans\`."
  local case model cluster layers
  for case in "${CASES[@]}"; do
    read -r model cluster layers <<< "$case"
    echo; heading "$model" "$cluster" "$layers"; echo
    # shellcheck disable=SC2046
    block plan --model "$model" $(layers_flag "$layers") --cluster "$cluster" "${WORKLOAD[@]}" \
      --top "$TOP"
  done
}

# The current page's part: "seeds" (the title and every seed's section) or
# "plans" (from the first `## ` heading that is not a seed's to the end).
part() {
  awk -v want="$1" '/^## / && !/^## Seed / { p = 1 } (want == "plans") == (p == 1)' "$DOC"
}

# Headings that TEXT (standard input) repeats, one a line; none: nothing.
repeated() {
  { grep -E '^#{1,3} ' || true; } | sort | uniq -d
}

refuse() {  # WHY [WHAT TO DO]: the page is left as it was
  echo "reproduce-docs: $1; $DOC was left as it was${2:+; $2}" >&2
  exit 1
}

WHOLE="rebuild it whole: bash scripts/reproduce-docs.sh"

keep() {  # PART: that part of the current page, refused where missing or repeated
  local text twice
  text=$(part "$1")
  case "$1" in
    seeds) grep -q '^## Seed ' <<< "$text" || refuse "$DOC has no seed sections to keep" "$WHOLE" ;;
    plans) grep -q '^## ' <<< "$text" || refuse "$DOC has no plans section to keep" "$WHOLE" ;;
  esac
  twice=$(repeated <<< "$text")
  [ -z "$twice" ] || refuse "the $1 part of $DOC repeats headings (${twice//$'\n'/; })" "$WHOLE"
  echo "$text"
}

case "${1:-all}" in
  all) { seeds; echo; plans; } > "$OUT/page" ;;
  seeds) plans_text=$(keep plans); { seeds; echo; echo "$plans_text"; } > "$OUT/page" ;;
  plans) seeds_text=$(keep seeds); { echo "$seeds_text"; echo; plans; } > "$OUT/page" ;;
  *) echo "usage: bash scripts/reproduce-docs.sh [all|seeds|plans]" >&2; exit 2 ;;
esac
twice=$(repeated < "$OUT/page")
[ -z "$twice" ] || refuse "the page would repeat headings (${twice//$'\n'/; })"
run_blocks
awk -v dir="$OUT" '/^@@block [0-9]+@@$/ {
    f = dir "/" substr($2, 1, length($2) - 2)
    while ((getline line < f) > 0) print line
    close(f); next
  } { print }' "$OUT/page" > "$DOC.new"
mv "$DOC.new" "$DOC"
