"""Part 2 benchmark: the corpus pass on SmolLM2 over the demo corpus, against a plain forward pass.

    .venv/bin/python bench/part2_corpus_pass.py [--max-tokens 100000] [--corpus data/wordnet.txt]

Measured in this one run, over the very same batches (same tokenisation, window and packing):
1. a plain forward pass of the whole model (LM head included), no hooks;
2. the full extraction (``catalog.runs.local.extract``): corpus pass, ablation, weights, ingest;
3. a plain forward pass of the backbone only (no LM head), as the corpus pass runs it.
Plain passes before and after the extraction put drift in machine speed on both sides of it.
The target is corpus-pass time / plain time <= 1.25 (i.e. tokens/s ratio plain / corpus >= 0.8).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--max-tokens", type=int, default=100_000)
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="plain-vs-corpus-pass comparison only (the extraction itself runs fp32)")
    ap.add_argument("--skip-extract", action="store_true", help="only the pass comparison (no ablation/ingest)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward batch (default: extract's)")
    args = ap.parse_args()
    tmp = None
    if "CATALOG_DATABASE_URL" not in os.environ and "CATALOG_DATA_DIR" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="nc-bench2-")
        os.environ["CATALOG_DATA_DIR"] = tmp.name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    importlib.import_module("catalog")  # first: it sets GOMP_SPINCOUNT, read when torch loads

    import torch
    import transformers

    from catalog.corpus import load_corpus
    from catalog.extract.corpus_pass import corpus_pass, plain_pass
    from catalog.extract.pipeline import Parameters
    from catalog.extract.windows import tokenise
    from catalog.loading import load
    from catalog.runs.local import extract
    from catalog.runs.schemas import ExtractRequest
    from catalog.store.database import stop_embedded

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params = Parameters() if args.batch_tokens is None else Parameters(batch_tokens=args.batch_tokens)
    print(f"# part 2 benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}")
    loaded = load(args.model, device=args.device)
    model = loaded.model
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    print(f"device {loaded.device}  dtype {args.dtype}  model {args.model}")
    corpus = load_corpus(args.corpus)
    tok = tokenise(corpus.documents, loaded.tokenizer, window=params.window, max_tokens=args.max_tokens)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    print(f"corpus {args.corpus.name}: {tok.n_tokens} tokens, {len(tok.tokens)} documents, "
          f"{len(tok.windows)} windows, batches of {params.batch_tokens} tokens")

    def plain(head: bool) -> float:
        n, s = plain_pass(model, tok, batch_tokens=params.batch_tokens, pad=pad, head=head)
        return n / s

    def hooked() -> float:
        # as the extraction runs it: key-projection hooks too (gate-open fraction, part 5)
        r = corpus_pass(model, loaded.view.value_projs(), tok, top_n=params.top_n, gated=loaded.view.gated,
                        batch_tokens=params.batch_tokens, pad=pad, key_projs=loaded.view.key_projs())
        return r.tokens / r.seconds

    def hooked_without_firing() -> float:
        # part 4's corpus pass: no key-projection hooks, no |coefficient| histogram
        r = corpus_pass(model, loaded.view.value_projs(), tok, top_n=params.top_n, gated=loaded.view.gated,
                        batch_tokens=params.batch_tokens, pad=pad, firing=False)
        return r.tokens / r.seconds

    if loaded.device.type == "cuda":  # CUDA context, cuBLAS handles and kernel choice outside the timings
        warm = tokenise(corpus.documents, loaded.tokenizer, window=params.window, max_tokens=4 * params.batch_tokens)
        plain_pass(model, warm, batch_tokens=params.batch_tokens, pad=pad, head=True)
        corpus_pass(model, loaded.view.value_projs(), warm, top_n=params.top_n, gated=loaded.view.gated,
                    batch_tokens=params.batch_tokens, pad=pad, key_projs=loaded.view.key_projs())
    plain_head = plain(head=True)
    print(f"  plain pass (with LM head)     {plain_head:8.1f} tok/s", flush=True)
    if args.skip_extract:
        cp = hooked()
        summary = None
    else:
        del model
        summary = extract(ExtractRequest(model=args.model, name="bench-part2", corpus=str(args.corpus),
                                         max_tokens=args.max_tokens, device=args.device, params=params))
        cp = summary.counts["tokens"] / summary.timings["corpus_pass"]
        model = loaded.model
    print(f"  corpus pass                   {cp:8.1f} tok/s", flush=True)
    plain_body = plain(head=False)
    print(f"  plain pass (backbone only)    {plain_body:8.1f} tok/s")
    cp_no_firing = hooked_without_firing()
    print(f"  corpus pass without the gate-open hooks and |coefficient| histogram {cp_no_firing:8.1f} tok/s")
    print(f"  time ratio corpus pass / without them       {cp_no_firing / cp:5.2f}")
    print(f"  time ratio without them / plain (with head) {plain_head / cp_no_firing:5.2f}")
    print(f"  time ratio corpus pass / plain (with head)  {plain_head / cp:5.2f}   (target <= 1.25)")
    print(f"  time ratio corpus pass / plain (backbone)   {plain_body / cp:5.2f}")
    if summary is not None:
        t, c = summary.timings, summary.counts
        print("\nextraction stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
        print(f"  ablation: {t['ablation']:.1f} s for {c['ablation_tokens']} tokens "
              f"({c['ablation_tokens'] / t['ablation']:.1f} tok/s, {t['ablation'] / t['corpus_pass']:.2f}x the corpus pass), "
              f"{c['prefixes']} distinct trigger prefixes")
        print(f"  ingest: {t['ingest']:.1f} s for {sum(c['rows'].values())} rows")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    stop_embedded()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
