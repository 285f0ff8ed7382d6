"""Part 10 benchmark: exact similar-neuron lists on SmolLM2, against a plain forward pass, in one run.

    .venv/bin/python bench/part10_similar.py [--max-tokens 20000] [--device cpu|cuda] [--check 200]

1. A plain forward pass of the whole model over --max-tokens tokens of the demo corpus (the yardstick
   of issue 19's stage ratios).
2. ``similar_lists`` for the key and the value vectors (46,080 x 576 each): seconds, and the ratio to
   the forward pass. The HNSW indexes they replace are timed by the extraction itself (the stage
   timings ``index_key_cos``; see docs/benchmarks.md).
3. Exactness: --check random neurons per space against numpy in float64 over the same float32
   vectors (every other neuron scored); list lengths; the bytes the lists take as stored.
4. Per request: the list path's Python work (filtering a 50-entry list to a layer range), timed
   in process over many calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    ap.add_argument("--check", type=int, default=200, help="neurons per space checked against numpy")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    import transformers

    from catalog.corpus import load_corpus
    from catalog.extract.corpus_pass import plain_pass
    from catalog.extract.neighbours import similar_lists
    from catalog.extract.pipeline import Parameters
    from catalog.extract.windows import tokenise
    from catalog.loading import load
    from catalog.read.vectors import _from_list

    transformers.logging.set_verbosity_error()
    params = Parameters()
    print(f"# part 10 similar-neuron lists  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}")
    loaded = load(args.model, device=args.device)
    view = loaded.view
    corpus = load_corpus(args.corpus)
    tok = tokenise(corpus.documents, loaded.tokenizer, window=params.window, max_tokens=args.max_tokens)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    n, plain_s = plain_pass(loaded.model, tok, batch_tokens=params.batch_tokens, pad=pad, head=True)
    print(f"device {loaded.device}  plain forward pass: {n} tokens in {plain_s:.1f} s ({n / plain_s:.0f} tok/s)")

    with torch.inference_mode():
        layers = [view.layer(i) for i in range(view.n_layers)]
        spaces = {"key": torch.cat([w.keys.detach().float() for w in layers]),
                  "value": torch.cat([w.values.detach().float() for w in layers])}
    d_mlp = view.d_mlp
    rng = np.random.default_rng(0)
    total = 0.0
    for space, V in spaces.items():
        t0 = time.perf_counter()
        lists = similar_lists(V.to(loaded.device))
        s = time.perf_counter() - t0
        total += s
        N, d = V.shape
        stored = int(lists.length.sum()) * (4 + 8) + N * (4 * 2 + 24 + 2 * 24)  # arrays + row and array headers
        print(f"{space}: {N} x {d}: {s:.1f} s = {s / plain_s:.2f}x the forward pass; list length "
              f"min {lists.length.min()} mean {lists.length.mean():.2f}; about {stored / 2**20:.0f} MiB stored")
        V64 = V.cpu().double().numpy()
        unit = V64 / np.linalg.norm(V64, axis=1, keepdims=True)
        exact = 0
        sample = rng.choice(N, size=min(args.check, N), replace=False)
        for i in sample:
            cos = unit @ unit[i]
            cos[i] = -np.inf
            ids, _ = lists.row(int(i))
            want = np.lexsort((np.arange(N), -cos))[: len(ids)]
            exact += int(np.array_equal(ids, want))
        print(f"  exact head of numpy's order for {exact} / {len(sample)} sampled neurons")
        ids, cos = lists.row(int(sample[0]))
        id_list, cos_list = ids.tolist(), cos.tolist()
        reps = 20_000
        t0 = time.perf_counter()
        for r in range(reps):
            lo = r % view.n_layers
            _from_list(id_list, cos_list, d_mlp, lo, view.n_layers - 1, 5)
        print(f"  list path, Python per request: {1e6 * (time.perf_counter() - t0) / reps:.1f} us")
    print(f"both spaces: {total:.1f} s = {total / plain_s:.2f}x the forward pass over {n} tokens")


if __name__ == "__main__":
    main()
