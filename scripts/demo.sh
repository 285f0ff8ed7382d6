#!/usr/bin/env bash
# Set up (scripts/setup.sh), then catalog the packaged SmolLM2-135M-Instruct over the WordNet demo
# corpus into the embedded Postgres, export it and show where to look.
# DEMO_MAX_TOKENS (default 20000) sets how much of the corpus the corpus pass reads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NC=.venv/bin/neuron-catalog
NAME=SmolLM2-135M-Instruct
mkdir -p out
$NC extract --model smollm2 --name "$NAME" --corpus data/wordnet.txt --max-tokens "${DEMO_MAX_TOKENS:-20000}"
$NC export --model "$NAME" --out "out/$NAME.jsonl"
$NC layers --model "$NAME"
$NC show --model "$NAME" --layer 20 --neuron 7
DB=${CATALOG_DATABASE_URL:-"the embedded Postgres in $(.venv/bin/python -c 'from catalog.config import settings; print(settings.embedded_pgdata)')"}
cat <<MSG

Done: the catalog of $NAME is in $DB.
Where to look:
  out/$NAME.jsonl
      one record per neuron: weights, value tokens, triggers, agreement, ablation (README explains each field)
  .venv/bin/neuron-catalog show --model $NAME --layer L --neuron N
      one neuron, as above
  .venv/bin/neuron-catalog layers --model $NAME
      per-layer figures: weight statistics, agreement, ablation, label counts (seed 000 / 001)
  .venv/bin/neuron-catalog runs
      runs, their status and parameters
MSG
