"""Part 10 benchmark: the corpus pass with its fold compiled (catalog/extract/fold.py) against the torch
operations it replaced on CPU, and both against a plain forward pass, in one run.

    PYTHONPATH=. .venv/bin/python bench/part10_fold.py [--max-tokens 20000] [--rounds 2] [--micro]

SmolLM2 over the demo corpus, the same batches for all three, alternating within each round (the
machines here drift by tens of percent within an hour): the backbone with no hooks (plain, as
``plain_pass(head=False)``), the corpus pass with the compiled fold, and with ``compiled=False``.
Prints each one's seconds, the ratios to plain, and whether the two folds agree (triggers, counts
and histograms exactly; the largest relative difference of the moments). ``--micro``: also one
layer's fold of 4,096 x 1,536 random coefficients, timed alone.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def micro() -> None:
    import torch

    from catalog.extract.fold import count_positive, fold
    from catalog.extract.states import FiringStats, RunningStats, masked_extremes

    g = torch.Generator().manual_seed(0)
    coeffs, pre = torch.randn(8, 512, 1536, generator=g), torch.randn(8, 512, 1536, generator=g)
    counted = torch.ones(8, 512, dtype=torch.bool)
    counted[:, 0] = False

    def torch_ops() -> None:  # corpus_pass's on_layer and on_preactivation with compiled=False
        stats, fire = RunningStats.empty(1536, coeffs.device), FiringStats.empty(1536, coeffs.device)
        keep = counted.unsqueeze(-1)
        masked = torch.where(keep, coeffs, -math.inf)
        best, _ = masked_extremes(masked)
        stats.update(coeffs, counted, best)
        fire.add_masked(masked, counted)
        masked.masked_fill_(~keep, math.inf)
        masked_extremes(masked, lowest=True)
        fire.add_preactivation(pre, counted)

    def compiled() -> None:
        fold(coeffs, counted, lowest=True, histogram=True)
        count_positive(pre, counted)

    times: dict[str, list[float]] = {"torch": [], "compiled": []}
    for _ in range(5):
        for name, fn in (("torch", torch_ops), ("compiled", compiled)):
            fn()
            t = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - t) / 10)
    a, b = min(times["torch"]), min(times["compiled"])
    print(f"one layer's fold, 4,096 positions x 1,536 neurons (gated: maxima, minima, moments, histogram, gate): "
          f"torch {1e3 * a:.1f} ms, compiled {1e3 * b:.1f} ms (best of 5 x 10; compiled / torch {b / a:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    importlib.import_module("catalog")  # first: it sets GOMP_SPINCOUNT, read when torch loads

    import torch
    import transformers

    from catalog.corpus import load_corpus
    from catalog.extract.corpus_pass import corpus_pass, plain_pass
    from catalog.extract.params import Parameters
    from catalog.extract.windows import tokenise
    from catalog.loading import load

    transformers.logging.set_verbosity_error()
    print(f"# part 10 fold  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
          flush=True)
    if args.micro:
        micro()
    loaded = load("smollm2")
    view, tok, params = loaded.view, loaded.tokenizer, Parameters()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    corpus = tokenise(load_corpus(REPO / "data" / "wordnet.txt").documents, tok, window=params.window,
                      max_tokens=args.max_tokens)
    print(f"{corpus.n_tokens} demo tokens, batches of {params.batch_tokens} tokens", flush=True)

    def run(compiled: bool) -> object:
        return corpus_pass(view.model, view.value_projs(), corpus, top_n=params.top_n, gated=view.gated,
                           batch_tokens=params.batch_tokens, pad=pad, key_projs=view.key_projs(), compiled=compiled)

    run(True)  # compiles (or loads the cached compilation) and warms up
    times: dict[str, list[float]] = {"plain": [], "compiled": [], "torch": []}
    results = {}
    for r in range(args.rounds):
        for name, spent in times.items():
            t = time.perf_counter()
            if name == "plain":
                plain_pass(view.model, corpus, batch_tokens=params.batch_tokens, pad=pad, head=False)
            else:
                results[name] = run(name == "compiled")
            spent.append(time.perf_counter() - t)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    total = {k: sum(v) for k, v in times.items()}
    print(f"corpus pass / plain: compiled fold {total['compiled'] / total['plain']:.3f}, torch fold "
          f"{total['torch'] / total['plain']:.3f}; compiled / torch {total['compiled'] / total['torch']:.3f}")
    a, b = results["compiled"], results["torch"]
    same = all(torch.equal(x.values, y.values) and torch.equal(x.documents, y.documents)
               and torch.equal(x.positions, y.positions)
               for x, y in zip(a.top + (a.bottom or []), b.top + (b.bottom or []), strict=True))  # type: ignore[attr-defined]
    hist = all(torch.equal(x.abs_hist, y.abs_hist) and torch.equal(x.gate_open, y.gate_open)
               for x, y in zip(a.firing, b.firing, strict=True))  # type: ignore[attr-defined]
    rel = max(float(((x.m2 - y.m2).abs() / y.m2.abs().clamp_min(1e-12)).max())
              for x, y in zip(a.stats, b.stats, strict=True))  # type: ignore[attr-defined]
    mean = max(float(((x.mean - y.mean).abs() / (y.m2 / y.count).sqrt().clamp_min(1e-12)).max())
               for x, y in zip(a.stats, b.stats, strict=True))  # type: ignore[attr-defined]
    print(f"the same triggers (top and bottom): {same}; the same histograms and gate counts: {hist}; "
          f"largest difference of a mean / its std {mean:.2e}, of m2 relative {rel:.2e}")


if __name__ == "__main__":
    main()
