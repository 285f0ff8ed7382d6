"""Part 10 benchmark: this checkout's neighbour lists and ablation against an earlier revision's, in one run.

    PYTHONPATH=. .venv/bin/python bench/part10_against.py [--rev acad77a] [--layers 4] [--n 46080]
                                                          [--ablation-tokens 5000] [--rounds 2]

The machines here drift by tens of percent within an hour, so a change is timed against the code it
replaced in the same process, old and new alternating, and their results compared:

1. token lists (``TokenLists``) over the first --layers SmolLM2 value layers (raw logits and cosines,
   the products computed once, not timed), with ``catalog/extract/neighbours.py`` of --rev loaded
   beside this checkout's;
2. ``similar_lists`` of --n random vectors of SmolLM2's width (576), the same two modules;
3. the corpus pass and ablations over --ablation-tokens demo tokens (0 skips it): the random rows'
   window starts run once by the ablation (before), or kept by the pass (``StartCache``) and read (now).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def module_at(rev: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    fd, tmp = tempfile.mkstemp(suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, tmp)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def same_lists(a: Any, b: Any) -> str:
    import numpy as np

    ok = np.array_equal(a.ids, b.ids) and np.array_equal(a.length, b.length)
    diff = float(np.nanmax(np.abs(a.scores - b.scores))) if a.scores.size else 0.0
    return f"ids and lengths {'equal' if ok else 'DIFFER'}, max |score difference| {diff:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="acad77a", help="the revision to hold this checkout against")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=46_080)
    ap.add_argument("--ablation-tokens", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    from catalog.extract import neighbours as nb_new
    from catalog.loading import load

    transformers.logging.set_verbosity_error()
    nb_old = module_at(args.rev, "catalog/extract/neighbours.py", "neighbours_old")
    print(f"# part 10 against {args.rev}  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}", flush=True)
    loaded = load("smollm2")
    view = loaded.view
    E = view.unembedding().detach().float()
    values = [p.weight.detach().float().T.contiguous() for p in view.value_projs()[: args.layers]]
    logits = [v @ E.T for v in values]

    def timed(label: str, fn: Any) -> tuple[float, Any]:
        t = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t
        print(f"  {label}: {took:.1f} s", flush=True)
        return took, out

    def token_lists(nb: ModuleType) -> Any:
        tl = nb.TokenLists(E, None, view.d_mlp)
        for layer, (v, lg) in enumerate(zip(values, logits, strict=True)):
            tl.add(layer, v, lg, None)
        return tl.finish()

    torch.manual_seed(0)
    V = torch.randn(args.n, 576)
    results: dict[str, list[float]] = {}
    outs: dict[str, Any] = {}
    for r in range(args.rounds):
        print(f"round {r + 1}", flush=True)
        for name, nb in (("before", nb_old), ("now", nb_new)):
            t, outs[f"tokens {name}"] = timed(f"token lists, {args.layers} layers, {name}", lambda nb=nb: token_lists(nb))
            results.setdefault(f"tokens {name}", []).append(t)
            t, outs[f"similar {name}"] = timed(f"similar lists, {args.n} x 576, {name}", lambda nb=nb: nb.similar_lists(V))
            results.setdefault(f"similar {name}", []).append(t)
    for kind in ("tokens", "similar"):
        b, n = results[f"{kind} before"], results[f"{kind} now"]
        print(f"{kind}: before {' / '.join(f'{x:.1f}' for x in b)} s, now {' / '.join(f'{x:.1f}' for x in n)} s, "
              f"now / before {sum(n) / sum(b):.2f}")
    for key in outs["tokens now"]:
        print(f"token lists {key}: {same_lists(outs['tokens before'][key], outs['tokens now'][key])}")
    print(f"similar lists: {same_lists(outs['similar before'], outs['similar now'])}")
    if args.ablation_tokens:
        ablation(loaded, args.ablation_tokens, args.rounds)


def ablation(loaded: Any, max_tokens: int, rounds: int) -> None:
    import torch

    from catalog.corpus import load_corpus
    from catalog.extract import ablation as abl
    from catalog.extract import pipeline as pl
    from catalog.extract.windows import tokenise

    params = pl.Parameters()
    corpus = tokenise(load_corpus(REPO / "data" / "wordnet.txt").documents, loaded.tokenizer, window=params.window,
                      max_tokens=max_tokens)
    print(f"corpus pass and ablation over {corpus.n_tokens} demo tokens", flush=True)
    got: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    table = None
    for r in range(rounds):
        # before: the pass keeps nothing and the ablation runs each window's start once; now: the pass
        # keeps the starts (StartCache) and the ablation reads them
        for name in ("before", "now"):
            starts = pl.start_cache(loaded.view, params, 8 << 30) if name == "now" else None
            t = time.perf_counter()
            state = pl.pass_state(loaded.view, loaded.tokenizer, corpus, params, starts=starts)
            t_pass = time.perf_counter() - t
            table = abl.prefix_table(corpus, state.top, state.bottom)
            t = time.perf_counter()
            got[name], tokens = pl.ablate(loaded.view, loaded.tokenizer, corpus, table, params, starts=starts)
            t_abl = time.perf_counter() - t
            times.setdefault(f"{name} pass", []).append(t_pass)
            times.setdefault(f"{name} ablation", []).append(t_abl)
            kept = "" if starts is None else f", {len(starts)} starts kept ({starts.used / 2**20:.0f} MiB)"
            print(f"  round {r + 1}, {name}: pass {t_pass:.1f} s, ablation {t_abl:.1f} s, {tokens} ablated tokens"
                  f"{kept}", flush=True)
            if starts is not None:
                starts.clear()
    for part in ("pass", "ablation"):
        print(f"{part}: now / before {sum(times[f'now {part}']) / sum(times[f'before {part}']):.2f}")
    both = [sum(times[f"{n} pass"]) + sum(times[f"{n} ablation"]) for n in ("before", "now")]
    print(f"pass + ablation: now / before {both[1] / both[0]:.2f}; ablation / pass: before "
          f"{sum(times['before ablation']) / sum(times['before pass']):.2f}, now "
          f"{sum(times['now ablation']) / sum(times['now pass']):.2f}")
    for kind in ("first", "random"):
        a, b = got["before"][kind], got["now"][kind]
        diff = max(float(torch.nan_to_num((x - y).abs(), nan=0.0).max()) for x, y in zip(a, b, strict=True))
        rel = max(float(torch.nan_to_num((x - y).abs() / x.abs().clamp_min(1e-3), nan=0.0).max())
                  for x, y in zip(a, b, strict=True))
        top = max(float(torch.nan_to_num(x.abs(), nan=0.0).max()) for x in a)
        same_nan = all(torch.equal(torch.isnan(x), torch.isnan(y)) for x, y in zip(a, b, strict=True))
        print(f"{kind} ablation coefficients (largest |before| {top:.3g}): max |now - before| {diff:.3g}, "
              f"relative to max(|before|, 1e-3) {rel:.3g}; the same ones missing: {same_nan}")


if __name__ == "__main__":
    sys.exit(main())
