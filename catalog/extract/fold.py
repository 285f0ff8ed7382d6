"""The corpus pass's per-layer fold on CPU, compiled.

For each batch and layer the pass needs, per neuron: each row's extremes and their first positions
(the top-N candidates), the moments, the positive count and the |coefficient| histogram. As torch
operations (``corpus_pass``'s CUDA path) that is about 25 passes over a [positions, d_mlp] tensor
that does not fit in cache: about 50 ms per layer per 4,096 tokens on SmolLM2, a third of the plain
forward pass. Here a few compiled loops (numba) walk the counted positions in memory order, each
keeping its per-neuron accumulators in cache, with the neurons split over as many threads as torch
uses; each neuron is summed by one thread in position order, so the result does not depend on how
many threads ran it.

The extremes, positions, positive counts and histogram equal the torch path's exactly. The moments
are summed in float64 about a shift (the batch's first counted coefficient, so a large mean does
not cancel): closer to the exact value than the torch path's float32 products, so the two agree to
float32 rounding (tests/test_fold.py holds both against numpy in float64).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch

from catalog.extract.states import ABS_BINS, ABS_FIRST, ABS_SHIFT, TopState

_BLOCK = 128  # the threads' ranges of neurons are whole multiples of this: whole cache lines of a row


def _compiled(f: Callable[..., None]) -> Callable[..., None]:
    """Compiled on first use (about 3 s) and cached beside this file, else in NUMBA_CACHE_DIR; where
    neither is writable (a read-only install with no cache directory set), compiled per process.

    Serial, without the GIL: the neuron ranges run on this module's Python threads. Numba's own
    parallel loops would load a second OpenMP runtime beside torch's, and with it torch's matrix
    products stopped being reproducible to the bit between processes (tests/test_shards.py)."""
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(f)  # type: ignore[no-any-return]
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(f)  # type: ignore[no-any-return]


# One small loop per figure: fused into one loop body, LLVM vectorised none of them (26 ms against
# 7 ms for the four loops apart, per 4,096 x 1,536 coefficients on one core), and a row segment read
# again is in cache. Each loop walks the neurons lo..hi-1 of every counted position in memory order,
# through slices indexed from 0 (an index numba cannot prove non-negative costs a wraparound check
# per element, and the loop is no longer vectorised: 5x slower).
@_compiled
def _moments(x: np.ndarray, at: np.ndarray, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray,
             lo: int, hi: int) -> None:  # pragma: no cover - compiled
    c0, a1, a2 = shift[lo:hi], s1[lo:hi], s2[lo:hi]
    for k in range(at.shape[0]):
        row = x[at[k, 0], at[k, 1], lo:hi]
        for d in range(hi - lo):
            c = np.float64(row[d]) - c0[d]
            a1[d] += c
            a2[d] += c * c


@_compiled
def _positive(x: np.ndarray, at: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:  # pragma: no cover
    o = out[lo:hi]
    for k in range(at.shape[0]):
        row = x[at[k, 0], at[k, 1], lo:hi]
        for d in range(hi - lo):
            o[d] += np.int32(row[d] > 0)


@_compiled
def _extremes(x: np.ndarray, at: np.ndarray, sign: np.float32, best: np.ndarray, where: np.ndarray,
              lo: int, hi: int) -> None:  # pragma: no cover - compiled
    """Per row, the largest ``sign * x`` and its first position; best/where hold -inf and 0 on entry."""
    for k in range(at.shape[0]):
        r, p = at[k, 0], at[k, 1]
        row, b, w = x[r, p, lo:hi], best[r, lo:hi], where[r, lo:hi]
        q = np.int32(p)
        for d in range(hi - lo):
            v = row[d] * sign
            better = v > b[d]  # strict: the first position of the extreme, as torch.max
            b[d] = max(v, b[d])
            w[d] = q if better else w[d]


@_compiled
def _histogram(bits: np.ndarray, at: np.ndarray, hist: np.ndarray, lo: int, hi: int) -> None:  # pragma: no cover
    """states.abs_histogram's bins, from the float32 bits."""
    over = ABS_BINS + 1
    h = hist[lo:hi]
    for k in range(at.shape[0]):
        row = bits[at[k, 0], at[k, 1], lo:hi]
        for d in range(hi - lo):
            b = ((row[d] & 0x7FFFFFFF) >> ABS_SHIFT) - (ABS_FIRST - 1)
            h[d, min(max(b, 0), over)] += 1


_CHUNK = 64  # positions folded by every loop in turn: 64 x 1,536 float32 stay in L2 (11 -> 7 ms)


@_compiled
def _fold(x: np.ndarray, at: np.ndarray, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray, positive: np.ndarray,
          best: np.ndarray, where: np.ndarray, low: np.ndarray, low_where: np.ndarray, hist: np.ndarray, lowest: bool,
          histogram: bool, lo: int, hi: int) -> None:  # pragma: no cover - compiled
    n = at.shape[0]
    for k0 in range(0, n, _CHUNK):
        chunk = at[k0:min(n, k0 + _CHUNK)]
        _moments(x, chunk, shift, s1, s2, lo, hi)
        _positive(x, chunk, positive, lo, hi)
        _extremes(x, chunk, np.float32(1), best, where, lo, hi)
        if lowest:
            _extremes(x, chunk, np.float32(-1), low, low_where, lo, hi)
        if histogram:
            _histogram(x.view(np.int32), chunk, hist, lo, hi)


@_compiled
def _merge_top(values: np.ndarray, docs: np.ndarray, positions: np.ndarray, previous: np.ndarray, cv: np.ndarray,
               cdoc: np.ndarray, cpos: np.ndarray, cprev: np.ndarray, lo: int, hi: int) -> None:  # pragma: no cover
    """Insert candidates [m, d_mlp] (documents [m]) into the sorted [d_mlp, n] state of neurons lo..hi-1."""
    n = values.shape[1]
    vs, ds, ps, qs = values[lo:hi], docs[lo:hi], positions[lo:hi], previous[lo:hi]
    for j in range(cv.shape[0]):
        doc = cdoc[j]
        row, prow, qrow = cv[j, lo:hi], cpos[j, lo:hi], cprev[j, lo:hi]
        for d in range(hi - lo):
            v = row[d]
            # stronger than the weakest kept: (value descending, document ascending), states.sort_key's order
            if v > vs[d, n - 1] or (v == vs[d, n - 1] and doc < ds[d, n - 1]):
                i = n - 1
                while i > 0 and (v > vs[d, i - 1] or (v == vs[d, i - 1] and doc < ds[d, i - 1])):
                    vs[d, i], ds[d, i], ps[d, i], qs[d, i] = vs[d, i - 1], ds[d, i - 1], ps[d, i - 1], qs[d, i - 1]
                    i -= 1
                vs[d, i], ds[d, i], ps[d, i], qs[d, i] = v, doc, prow[d], qrow[d]


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Per process (a forked child has none of its parent's threads) and thread count."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"fold-{pid}")


def _split(d_mlp: int, run: Callable[[int, int], None]) -> None:
    """run(lo, hi) over disjoint ranges of whole blocks of neurons, one per torch CPU thread."""
    threads = max(1, min(torch.get_num_threads(), -(-d_mlp // _BLOCK)))
    if threads == 1:
        run(0, d_mlp)
        return
    pool = _pool(threads, os.getpid())
    per = -(-d_mlp // (threads * _BLOCK)) * _BLOCK
    for f in [pool.submit(run, lo, min(d_mlp, lo + per)) for lo in range(0, d_mlp, per)]:
        f.result()


@dataclass
class Folded:
    """One batch of one layer, folded: [rows, d_mlp] extremes and positions (``low`` None unless asked),
    and over the counted positions: their number, mean and sum of squared deviations (float64),
    positive count, and the |coefficient| histogram (None unless asked)."""

    best: torch.Tensor
    at: torch.Tensor
    low: torch.Tensor | None
    low_at: torch.Tensor | None
    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    positive: torch.Tensor
    hist: torch.Tensor | None


def fold(coeffs: torch.Tensor, counted: torch.Tensor, *, lowest: bool, histogram: bool) -> Folded:
    """Fold ``coeffs`` [rows, positions, d_mlp] (a CPU tensor) over the ``counted`` [rows, positions] positions."""
    x = coeffs.detach().float().contiguous().numpy()
    rows, _, d_mlp = x.shape
    at = counted.nonzero().numpy()  # [n, 2] (row, position), in memory order
    n = len(at)
    shift = x[at[0, 0], at[0, 1]].astype(np.float64) if n else np.zeros(d_mlp)
    best, where = np.full((rows, d_mlp), -np.inf, np.float32), np.zeros((rows, d_mlp), np.int32)
    low, low_where = np.full((rows, d_mlp), -np.inf, np.float32), np.zeros((rows, d_mlp), np.int32)
    s1, s2, positive = np.zeros(d_mlp), np.zeros(d_mlp), np.zeros(d_mlp, np.int32)
    hist = np.zeros((d_mlp, ABS_BINS + 2) if histogram else (1, 1), np.int32)

    _split(d_mlp, lambda lo, hi: _fold(x, at, shift, s1, s2, positive, best, where, low, low_where, hist, lowest,
                                       histogram, lo, hi))
    mean = s1 / max(n, 1)
    m2 = np.maximum(s2 - s1 * mean, 0.0)
    return Folded(torch.from_numpy(best), torch.from_numpy(where.astype(np.int64)),
                  torch.from_numpy(-low) if lowest else None, torch.from_numpy(low_where.astype(np.int64)) if lowest else None,
                  n, torch.from_numpy(mean + shift), torch.from_numpy(m2), torch.from_numpy(positive.astype(np.float64)),
                  torch.from_numpy(hist.astype(np.int64)) if histogram else None)


def count_positive(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[d_mlp] float64: how many counted positions of ``x`` [rows, positions, d_mlp] (CPU) are > 0."""
    a = x.detach().float().contiguous().numpy()
    at = counted.nonzero().numpy()
    out = np.zeros(a.shape[2], np.int32)
    _split(a.shape[2], lambda lo, hi: _positive(a, at, out, lo, hi))
    return torch.from_numpy(out.astype(np.float64))


def merge_top(state: TopState, candidates: TopState) -> TopState:
    """``state.merge(candidates)`` for CPU tensors, in place of ``state``'s tensors: each candidate that
    beats a neuron's weakest kept one is inserted in order (after the first batches, few do), instead
    of a top-k over both. ``candidates`` as ``corpus_pass.batch_candidates`` makes them: transposed
    [n_docs, d_mlp] tensors, one document per column."""
    vs, ds, ps, qs = (t.numpy() for t in (state.values, state.documents, state.positions, state.previous))
    # a bfloat16 model's candidates (numpy has no bfloat16); .float() of float32 is the tensor itself
    cv, cq = (t.T.float().numpy() for t in (candidates.values, candidates.previous))
    cp = candidates.positions.T.numpy()
    cdoc = np.ascontiguousarray(candidates.documents[0].numpy())
    _split(vs.shape[0], lambda lo, hi: _merge_top(vs, ds, ps, qs, cv, cdoc, cp, cq, lo, hi))
    return state
