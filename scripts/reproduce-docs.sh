#!/usr/bin/env bash
# Rebuild docs/reproduce.md from `shardwise reproduce` for the five seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The seed experiments, reproduced"
  echo
  echo "Each section below is the output of \`shardwise reproduce SEED --results results/bench-h200x2.jsonl --profile src/shardwise/perf/profiles/h200-x2.json\` (COLUMNS=160): the seed's claimed figures beside the cost model's prediction for the exact seed workload on \`h100-sxm-16\` (two nodes of 8 H100 SXM, the seeds' setting), the seed's own inconsistencies, and what the 2x H200 machine measured on reduced workloads. Regenerate with \`bash scripts/reproduce-docs.sh\`."
  for s in 000 001 002 003 004; do
    echo; echo "## Seed $s"; echo; echo '```'
    COLUMNS=160 shardwise reproduce "$s" --results results/bench-h200x2.jsonl \
      --profile src/shardwise/perf/profiles/h200-x2.json
    echo '```'
  done
} > docs/reproduce.md
