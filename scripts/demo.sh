#!/usr/bin/env bash
# Set up (scripts/setup.sh), catalog the packaged SmolLM2-135M-Instruct over the WordNet demo corpus
# into the embedded Postgres, show one neuron, then serve the search API and review UI on it and print example URLs.
# DEMO_MAX_TOKENS (default 20000) sets how much of the corpus the corpus pass reads; DEMO_PORT
# (default 8000) the API port; DEMO_SERVE=0 stops after the catalog is built.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NC=.venv/bin/neuron-catalog
NAME=SmolLM2-135M-Instruct
PORT=${DEMO_PORT:-8000}
$NC db upgrade  # the schema (extraction never migrates; serve does too)
$NC extract --model smollm2 --name "$NAME" --corpus data/wordnet.txt --max-tokens "${DEMO_MAX_TOKENS:-20000}"
$NC layers --model "$NAME"
$NC show --model "$NAME" --layer 20 --neuron 7
# An annotator for the review UI (a rerun revokes the old token and prints a new one).
$NC users revoke demo >/dev/null 2>&1 || true
TOKEN=$($NC users add demo 2>/dev/null)
DB=${CATALOG_DATABASE_URL:-"the embedded Postgres in $(.venv/bin/python -c 'from catalog.config import settings; print(settings.embedded_pgdata)')"}
API="http://127.0.0.1:$PORT/api/v1/models/$NAME"
cat <<MSG

Done: the catalog of $NAME is in $DB.
The search API (neuron-catalog serve --port $PORT; the demo starts it now unless DEMO_SERVE=0, Ctrl-C stops it). Try:
  http://127.0.0.1:$PORT/docs                                       every route, parameter and field, runnable
  $API/neurons?layer_min=20&layer_max=29&token=Paris               layers 20-29, value promotes ' Paris' / 'Paris'
  $API/neurons?q=%22a%20person%22&sort=-activation_max              trigger prefixes with the phrase "a person"
  $API/neurons?layer=3&sort=alignment&limit=10                      layer 3, most negative key-value alignment first
  $API/tokens/%20city/neurons?k=20                                   token ranking: highest v.e(' city') over all values
  $API/neurons/20/7/similar?space=key&k=10                          neurons whose keys look like 20/7's
  curl -s -X POST $API/probe -H 'content-type: application/json' -d '{"text": "The capital of France is", "k": 5}'
The review UI: http://127.0.0.1:$PORT/  (sign in as 'demo' with the token $TOKEN)
  http://127.0.0.1:$PORT/models/$NAME/review?queue=first        annotate 10 neurons per layer by keyboard (1/2/3/0, Enter)
  http://127.0.0.1:$PORT/models/$NAME                            the seed figures by layer
  http://127.0.0.1:$PORT/models/$NAME/layers/20                   bias against key norm / value norm / alignment, histograms
  http://127.0.0.1:$PORT/models/$NAME/search?q=person             search pages over the same API
Other commands: $NC users add NAME | annotations export --out ann.jsonl | annotations agreement --model $NAME
  $NC runs | export --model $NAME --out FILE.jsonl | layers --model $NAME --out layers.csv
MSG
if [ "${DEMO_SERVE:-1}" != "0" ]; then
    exec $NC serve --port "$PORT"
fi
