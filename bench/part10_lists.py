"""Part 10 benchmark: exact neighbour lists on SmolLM2, against a plain forward pass, in one run.

    .venv/bin/python bench/part10_lists.py [--max-tokens 20000] [--device cpu|cuda] [--check 200]

1. A plain forward pass of the whole model over --max-tokens tokens of the demo corpus (the yardstick
   of issue 19's stage ratios).
2. Token lists as the extraction builds them: per layer the projection stage's two products
   (V.E^T raw and folded, timed as the baseline they ride on), then ``TokenLists.add`` and ``finish``.
3. ``similar_lists`` for the key and the value vectors (46,080 x 576 each).
   Each with its ratio to the forward pass. (The HNSW indexes they replace took 87 s at 20,000
   tokens in issue 19's stage table.)
4. Exactness: --check random tokens / neurons against numpy in float64 over the same float32
   vectors (every neuron scored); list lengths; the bytes the lists take as stored.
5. Per request: the list path's Python work (the first k of a 50-entry list in a layer range), in
   process over many calls.
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
    from catalog.extract.neighbours import TokenLists, similar_lists
    from catalog.extract.pipeline import Parameters
    from catalog.extract.weights import value_logits
    from catalog.extract.windows import tokenise
    from catalog.loading import load
    from catalog.read.vectors import in_range

    transformers.logging.set_verbosity_error()
    params = Parameters()
    print(f"# part 10 neighbour lists  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
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
        E = view.unembedding().detach().float()
        gain = view.final_norm_gain()
        folded_e = E if gain is None else E * gain.to(E.dtype)
        ranked = TokenLists(E, gain, view.d_mlp)
        products = adds = 0.0
        for i, w in enumerate(layers):
            t0 = time.perf_counter()
            logits = value_logits(w.values, E)
            folded = None if gain is None else value_logits(w.values, folded_e)
            t1 = time.perf_counter()
            ranked.add(i, w.values, logits, folded)
            products += t1 - t0
            adds += time.perf_counter() - t1
        t0 = time.perf_counter()
        token_lists = ranked.finish()
        finish = time.perf_counter() - t0
    print(f"projection products (the baseline, not new work): {products:.1f} s = {products / plain_s:.2f}x the pass")
    print(f"token lists: add {adds:.1f} s + finish {finish:.1f} s = {(adds + finish) / plain_s:.2f}x the pass "
          f"({(adds + finish) / products:.2f}x the products they ride on)")
    V = spaces["value"].cpu().numpy().astype(np.float64)
    E64 = {"raw": E.cpu().double().numpy()}
    if gain is not None:
        E64["folded"] = E64["raw"] * gain.detach().float().cpu().double().numpy()
    rng = np.random.default_rng(1)
    for (convention, order), lists in token_lists.items():
        exact = 0
        sample = rng.choice(len(E64["raw"]), size=min(args.check, len(E64["raw"])), replace=False)
        for t in sample:
            s = V @ E64[convention][t]
            if order == "cosine":
                s = s / np.linalg.norm(V, axis=1)
            ids, _ = lists.row(int(t))
            exact += int(np.array_equal(ids, np.lexsort((np.arange(len(V)), -s))[: len(ids)]))
        stored = int(lists.length.sum()) * (4 + 8) + len(lists.length) * (4 * 3 + 24 + 2 * 24)
        print(f"  {convention} {order}: exact head of numpy's order for {exact} / {len(sample)} sampled tokens; "
              f"length min {lists.length.min()} mean {lists.length.mean():.2f}; about {stored / 2**20:.0f} MiB stored")
    d_mlp = view.d_mlp
    rng = np.random.default_rng(0)
    total = 0.0
    for space, M in spaces.items():
        t0 = time.perf_counter()
        lists = similar_lists(M.to(loaded.device))
        s = time.perf_counter() - t0
        total += s
        N, d = M.shape
        stored = int(lists.length.sum()) * (4 + 8) + N * (4 * 2 + 24 + 2 * 24)  # arrays + row and array headers
        print(f"{space}: {N} x {d}: {s:.1f} s = {s / plain_s:.2f}x the forward pass; list length "
              f"min {lists.length.min()} mean {lists.length.mean():.2f}; about {stored / 2**20:.0f} MiB stored")
        V64 = M.cpu().double().numpy()
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
            in_range(id_list, cos_list, d_mlp, lo, view.n_layers - 1, 5)
        print(f"  list path, Python per request: {1e6 * (time.perf_counter() - t0) / reps:.1f} us")
    print(f"similar lists, both spaces: {total:.1f} s = {total / plain_s:.2f}x the forward pass over {n} tokens")
    print(f"all lists: {adds + finish + total:.1f} s = {(adds + finish + total) / plain_s:.2f}x the forward pass")


if __name__ == "__main__":
    main()
