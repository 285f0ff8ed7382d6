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
$NC show --model "$NAME" --layer 20 --neuron 7
cat <<MSG

Done. The catalog of $NAME is in the embedded Postgres under
  ${CATALOG_DATA_DIR:-$(.venv/bin/python -c 'from catalog.config import settings; print(settings.data_dir)')}
Where to look:
  out/$NAME.jsonl                               one record per neuron (also: --out FILE.parquet)
  .venv/bin/neuron-catalog show --model $NAME --layer L --neuron N
  .venv/bin/neuron-catalog runs                 runs, timings and status
  README.md                                     what every field means
MSG
