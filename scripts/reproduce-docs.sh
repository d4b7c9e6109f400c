#!/usr/bin/env bash
# Rebuild docs/reproduce.md: `shardwise reproduce` for the five seeds, then
# `shardwise plan` for large models on 16 and 64 H100s.
#   bash scripts/reproduce-docs.sh          # the whole document
#   bash scripts/reproduce-docs.sh plans    # only its plans section (the seeds' kept)
set -euo pipefail
cd "$(dirname "$0")/.."
DOC=docs/reproduce.md
PLANS_HEADING="## Plans for large models on 16 and 64 H100"
# MODEL CLUSTER LAYERS: LAYERS "-" ranks the whole model, N its first N layers
# only. On two busy cores the whole llama-3.1-70b took 7 minutes to rank on
# h100-sxm-16, and its first 16 layers did not finish in 18 on h100-sxm-64 (a
# 64-GPU ranking records many more compositions, each of more ranks).
CASES=(
  "llama-3.1-70b h100-sxm-16 -"
  "llama-3.1-405b h100-sxm-16 16"
  "mixtral-8x22b h100-sxm-16 16"
  "llama-3.1-70b h100-sxm-64 8"
  "llama-3.1-405b h100-sxm-64 8"
  "mixtral-8x22b h100-sxm-64 8"
)
WORKLOAD=(--batch 8 --seq 4096 --phase both)

seeds() {
  echo "# The seed experiments, reproduced"
  echo
  echo "Each section below is the output of \`shardwise reproduce SEED --results results/bench-h200x2.jsonl --profile src/shardwise/perf/profiles/h200-x2.json\` (COLUMNS=160): the seed's claimed figures beside the cost model's prediction for the exact seed workload on \`h100-sxm-16\` (two nodes of 8 H100 SXM, the seeds' setting), the seed's own inconsistencies, and what the 2x H200 machine measured on reduced workloads. Regenerate with \`bash scripts/reproduce-docs.sh\`."
  for s in 000 001 002 003 004; do
    echo; echo "## Seed $s"; echo; echo '```'
    COLUMNS=160 shardwise reproduce "$s" --results results/bench-h200x2.jsonl \
      --profile src/shardwise/perf/profiles/h200-x2.json
    echo '```'
  done
}

plans() {
  echo "$PLANS_HEADING"
  echo
  echo "Each table is the best 15 rows of \`shardwise plan --model MODEL --cluster CLUSTER ${WORKLOAD[*]} --top 15\` (COLUMNS=160): every plan and composition on all the cluster's GPUs, ranked by prefill plus decode time, for a serving workload of 8 sequences of 4096 tokens. \`h100-sxm-16\` is two nodes of 8 H100, \`h100-sxm-64\` eight; both are derived from one calibrated H100 and cited NVLink and InfiniBand figures (docs/costmodel.md, Profiles). Where the heading names a layer count, the model was ranked on its first layers only (\`--layers N\`), for the time a ranking takes on the two cores that wrote this page (the whole llama-3.1-70b on h100-sxm-16 took 7 minutes; its first 16 layers on h100-sxm-64 did not finish in 18): a cut model's figures are those of its first layers, and no plan has more pipeline stages than it has layers. Regenerate with \`bash scripts/reproduce-docs.sh plans\`."
  local model cluster layers
  for case in "${CASES[@]}"; do
    read -r model cluster layers <<< "$case"
    local cut=()
    echo
    if [ "$layers" = - ]; then
      echo "### $model on $cluster"
    else
      cut=(--layers "$layers")
      echo "### $model on $cluster (first $layers layers)"
    fi
    echo; echo '```'
    COLUMNS=160 shardwise plan --model "$model" "${cut[@]}" --cluster "$cluster" \
      "${WORKLOAD[@]}" --top 15 2>&1
    echo '```'
  done
}

if [ "${1:-all}" = plans ]; then
  kept=$(sed "/^$PLANS_HEADING\$/,\$d" "$DOC")
  { echo "$kept"; echo; plans; } > "$DOC.new"
else
  { seeds; echo; plans; } > "$DOC.new"
fi
mv "$DOC.new" "$DOC"
