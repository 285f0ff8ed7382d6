"""Part 10 benchmark: the labels and corpus-figure stages, before and after part 10's speed-ups.

    .venv/bin/python bench/part10_stages.py [--max-tokens 5000] [--corpus data/wordnet.txt]
                                            [--cache /tmp/part10.pt] [--layers 30]

On SmolLM2 over the demo corpus: a corpus pass and the ablations (or their saved result: --cache
reads the file when it holds the same corpus and token count, and writes it otherwise), then, on
the very same inputs and in this one run, each stage with the previous implementation
(tests/stages_reference.py, patched in) and with the current one, and their results compared:

- labels: ``analysis_from`` as the run records its "labels" time (label rule with its bootstrap,
  per-layer summaries, prefix texts);
- corpus figures: ``_add_corpus_figures`` of each layer (agreement and its baselines, token ranks,
  ablation means, the layer's medians), given the layer's value logits as the projection stage
  computes them (not timed). Old and new alternate layer by layer, so drift hits both alike.

A plain forward pass over the same tokens (LM head included) gives each stage as a ratio to it.
Both stages are fixed costs once every neuron has its N triggers (about 3,000 demo tokens), except
for the prefix texts, which grow with the prefixes (nearly one per token): the projection to
100,000 tokens adds those at the measured rate per prefix.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the previous implementations: tests/stages_reference.py


def same(a: Any, b: Any) -> bool:
    """Equal to the last bit (NaN equal to NaN), through dataclasses, dicts, lists and tensors."""
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0, math.inf, -math.inf),
                                                                  b.nan_to_num(0.0, math.inf, -math.inf))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--max-tokens", type=int, default=5000)
    ap.add_argument("--cache", type=Path, default=None, help="save/reuse the pass state and ablations here")
    ap.add_argument("--layers", type=int, default=None, help="corpus figures of the first L layers only (all)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers
    from stages_reference import previous

    from catalog.corpus import load_corpus
    from catalog.extract import ablation as abl
    from catalog.extract import pipeline as pl
    from catalog.extract.corpus_pass import plain_pass
    from catalog.extract.params import Parameters
    from catalog.extract.weights import value_logits
    from catalog.extract.windows import tokenise
    from catalog.loading import load

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params = Parameters()
    print(f"# part 10 stages benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}")
    loaded = load("smollm2", device="cpu")
    view, tokenizer = loaded.view, loaded.tokenizer
    key = {"corpus": str(args.corpus.resolve()), "max_tokens": args.max_tokens}
    cached = torch.load(args.cache, weights_only=False) if args.cache and args.cache.exists() else None
    if cached is not None and cached["key"] == key:
        tok, state, table, ablated = cached["corpus"], cached["state"], cached["table"], cached["ablated"]
        print(f"pass state and ablations read from {args.cache}")
    else:
        tok = tokenise(load_corpus(args.corpus).documents, tokenizer, window=params.window, max_tokens=args.max_tokens)
        t = time.perf_counter()
        state = pl.pass_state(view, tokenizer, tok, params)
        table = abl.prefix_table(tok, state.top, state.bottom)
        ablated, _ = pl.ablate(view, tokenizer, tok, table, params)
        print(f"corpus pass and ablations: {time.perf_counter() - t:.1f} s")
        if args.cache:
            torch.save({"key": key, "corpus": tok, "state": state, "table": table, "ablated": ablated}, args.cache)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_plain, s_plain = plain_pass(loaded.model, tok, batch_tokens=params.batch_tokens, pad=pad, head=True)
    triggers = float(torch.stack([(ids >= 0).sum(1).double().mean() for ids in table.top_ids]).mean())
    print(f"corpus {args.corpus.name}: {tok.n_tokens} tokens, {len(table)} prefixes, "
          f"{triggers:.1f} of {params.top_n} triggers per neuron on average")
    print(f"plain forward pass: {n_plain} tokens in {s_plain:.1f} s ({n_plain / s_plain:.0f} tok/s)")

    def analysis() -> tuple[pl.CorpusAnalysis, float]:
        t = time.perf_counter()
        a = pl.analysis_from(view, tokenizer, tok, state, table, ablated, params)
        return a, time.perf_counter() - t

    with previous():
        old_analysis, old_labels = analysis()
    new_analysis, new_labels = analysis()
    assert same(old_analysis.labels, new_analysis.labels) and same(old_analysis.firing, new_analysis.firing), \
        "labels differ"
    t = time.perf_counter()
    abl.prefix_texts(tok, table, tokenizer)
    texts = time.perf_counter() - t

    unembedding = view.unembedding().detach()
    gain = view.final_norm_gain()
    folded_e = unembedding if gain is None else unembedding * gain.to(unembedding.dtype)
    layers = range(view.n_layers if args.layers is None else min(args.layers, view.n_layers))
    old_figures = new_figures = 0.0
    with torch.inference_mode():
        for layer in layers:
            w = view.layer(layer)
            logits = value_logits(w.values, unembedding)
            folded = logits if gain is None else value_logits(w.values, folded_e)
            blank = pl.LayerRecord(layer=layer, stats={}, weights=None, keys=None, values=None,  # type: ignore[arg-type]
                                   ups=None, projection=None)  # type: ignore[arg-type]
            records = []
            for old in (True, False):
                record = copy.copy(blank)
                record.stats = {}
                t = time.perf_counter()
                if old:
                    with previous():
                        pl._add_corpus_figures(record, logits, folded, old_analysis, params)
                else:
                    pl._add_corpus_figures(record, logits, folded, new_analysis, params)
                dt = time.perf_counter() - t
                old_figures, new_figures = (old_figures + dt, new_figures) if old else (old_figures, new_figures + dt)
                records.append(record)
            a, b = records
            assert same(a.agreement, b.agreement) and same(a.stats, b.stats) and same(a.ablation, b.ablation), \
                f"layer {layer}: corpus figures differ"
    n_layers = len(layers)
    scale = view.n_layers / n_layers  # figures of a subset of layers, scaled to the model
    old_figures, new_figures = old_figures * scale, new_figures * scale
    print(f"results identical (labels, confidences, summaries; agreement, baselines, ranks, medians of {n_layers} layers)")
    print()
    print("| stage | previous (s) | now (s) | speed-up | previous / plain pass | now / plain pass |")
    print("|---|---|---|---|---|---|")
    for name, old_s, new_s in (("labels", old_labels, new_labels), ("corpus figures", old_figures, new_figures),
                               ("both", old_labels + old_figures, new_labels + new_figures)):
        print(f"| {name} | {old_s:.1f} | {new_s:.1f} | {old_s / new_s:.1f}x | {old_s / s_plain:.2f}x | "
              f"{new_s / s_plain:.2f}x |")
    if n_layers < view.n_layers:
        print(f"(corpus figures: {n_layers} of {view.n_layers} layers measured, scaled by {scale:.2f})")
    per_prefix = texts / max(len(table), 1)
    plain_100k = 100_000 / (n_plain / s_plain)
    projected = new_labels + new_figures + per_prefix * max(100_000 - len(table), 0)
    print(f"prefix texts: {texts:.1f} s ({per_prefix * 1e3:.2f} ms a prefix, inside labels)")
    print(f"projected to 100,000 tokens (~100,000 prefixes, plain pass {plain_100k:.0f} s at this rate): "
          f"labels + corpus figures {projected:.0f} s = {projected / plain_100k:.2f}x the plain pass")


if __name__ == "__main__":
    main()
