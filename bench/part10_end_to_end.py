"""Part 10 benchmark: a whole `extract` of the demo corpus against a plain forward pass, in one run.

    PYTHONPATH=. .venv/bin/python bench/part10_end_to_end.py [--max-tokens 20000] [--data-dir DIR]

Measured in this one process, over the same tokens (same tokenisation, windows and batches):
1. a plain forward pass of the whole model (LM head included, no hooks), before the extraction;
2. the extraction (``catalog.runs.local.extract``, the code `neuron-catalog extract` runs), wall time
   from the request to the published run, model loading included, into a fresh embedded Postgres
   unless --data-dir or CATALOG_DATABASE_URL says otherwise;
3. the same plain pass again, after it.
The plain time is the mean of 1 and 3 (drift in machine speed lands on both sides). Every stage the
run records is printed as seconds and as a ratio to the plain pass, then issue 19's groups.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# issue 19's groups of the stages a run records (catalog/runs/*.py, catalog/extract/pipeline.py)
GROUPS = {
    "analysis: labels, corpus figures and baselines (target <= 0.3x plain at 100k tokens)":
        ("labels", "corpus_figures", "baselines"),
    "ingest and every index: rows, search terms, neighbour lists (target <= 1x plain)":
        ("ingest", "search_terms", "token_lists", "similar_key", "similar_value"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    ap.add_argument("--data-dir", type=Path, help="embedded Postgres here (kept); default: a temporary one")
    ap.add_argument("--name", default="bench-part10-e2e")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward batch (default: extract's)")
    args = ap.parse_args()
    tmp = None
    if args.data_dir is not None:
        os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    elif "CATALOG_DATABASE_URL" not in os.environ and "CATALOG_DATA_DIR" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="nc-bench10-")
        os.environ["CATALOG_DATA_DIR"] = tmp.name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    importlib.import_module("catalog")  # first: it sets GOMP_SPINCOUNT, read when torch loads

    import torch
    import transformers

    from catalog.corpus import load_corpus
    from catalog.extract.corpus_pass import plain_pass
    from catalog.extract.pipeline import Parameters
    from catalog.extract.windows import tokenise
    from catalog.loading import load
    from catalog.runs.local import extract
    from catalog.runs.schemas import ExtractRequest
    from catalog.store import migrate
    from catalog.store.database import get_engine, stop_embedded

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params = Parameters() if args.batch_tokens is None else Parameters(batch_tokens=args.batch_tokens)
    print(f"# part 10 end to end  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}  "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}  load average {os.getloadavg()[0]:.2f}", flush=True)
    get_engine()  # start the embedded server outside the timings (the README's setup does it once)
    migrate.upgrade()
    loaded = load(args.model, device=args.device)
    corpus = load_corpus(args.corpus)
    tok = tokenise(corpus.documents, loaded.tokenizer, window=params.window, max_tokens=args.max_tokens)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    print(f"model {args.model} on {loaded.device}; corpus {args.corpus.name}: {tok.n_tokens} tokens, "
          f"{len(tok.windows)} windows", flush=True)

    def plain() -> float:
        n, s = plain_pass(loaded.model, tok, batch_tokens=params.batch_tokens, pad=pad, head=True)
        assert n == tok.n_tokens
        return s

    if loaded.device.type == "cuda":  # CUDA context, cuBLAS handles and kernel choice outside the timings
        warm = tokenise(corpus.documents, loaded.tokenizer, window=params.window, max_tokens=4 * params.batch_tokens)
        plain_pass(loaded.model, warm, batch_tokens=params.batch_tokens, pad=pad, head=True)
    before = plain()
    print(f"plain pass before: {before:.1f} s ({tok.n_tokens / before:.0f} tok/s)", flush=True)
    t = time.perf_counter()
    summary = extract(ExtractRequest(model=args.model, name=args.name, corpus=str(args.corpus),
                                     max_tokens=args.max_tokens, device=args.device, params=params))
    wall = time.perf_counter() - t
    after = plain()
    print(f"plain pass after:  {after:.1f} s ({tok.n_tokens / after:.0f} tok/s)")
    p = (before + after) / 2
    timings = summary.timings
    print(f"\nextract: {wall:.1f} s wall = {wall / p:.2f}x the plain pass ({p:.1f} s)  "
          f"[target: <= 8x at 20,000 tokens, <= 4x at 100,000]")
    print("\n| stage | seconds | x plain pass |\n|---|---|---|")
    for k, v in timings.items():
        if k != "total":
            print(f"| {k} | {v:.1f} | {v / p:.2f} |")
    listed = sum(v for k, v in timings.items() if k != "total")
    # ingest and search terms run beside the per-layer compute (sharded.one_behind): below zero, the overlap
    print(f"| (not in a stage: {wall - listed:.1f} s{'; below zero: stages that overlapped' if wall < listed else ''}) | | |")
    cp = timings.get("corpus_pass", float("nan"))
    print(f"\ncorpus pass: {cp / p:.2f}x plain  [target <= 1.15x]")
    print(f"ablation: {timings.get('ablation', float('nan')) / cp:.2f}x the corpus pass  [target <= 1.5x]")
    for title, keys in GROUPS.items():
        s = sum(timings.get(k, 0.0) for k in keys)
        missing = [k for k in keys if k not in timings]
        print(f"{title}: {s:.1f} s = {s / p:.2f}x" + (f"  (not recorded: {', '.join(missing)})" if missing else ""))
    c = summary.counts
    print(f"\nrows {sum(c['rows'].values()):,} ({', '.join(f'{k} {v:,}' for k, v in c['rows'].items())})")
    print(f"ablation tokens {c.get('ablation_tokens', 0):,}; window starts kept by the corpus pass: "
          f"{c.get('start_cache_windows', 0):,} ({c.get('start_cache_mb', 0):,} MiB)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    stop_embedded()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
