"""Exact similar-neuron lists of a run: for every neuron and space (key, value), the other neurons
with the highest cosine, best first, ties by (layer, neuron), from blocks of the Gram matrix.

Candidates are selected in float32, re-scored in float64 from the same float32 vectors the catalog
stores (what numpy computes from them), and cut to the prefix that float32's rounding cannot have
displaced: every neuron that is not a candidate scored at most s_c in float32, so at most s_c + delta
in float64 (s_c the last candidate's float32 score, delta a bound on float32's dot-product error).
A candidate above s_c + delta in float64 therefore beats every neuron outside the list, and the kept
prefix is exactly the head of the float64 order. A request whose answer is not inside that prefix
(a layer range that holds fewer than k of it, or k beyond it) scans instead (catalog/read/vectors.py).

A neuron is named by its flat id ``layer * d_mlp + neuron``, which orders like (layer, neuron).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# float32 unit roundoff; the bound takes three times Higham's gamma_d for a length-d dot product, which
# also covers the rounding of the unit vectors' norms.
_U = 2.0 ** -24
SPACES = ("key", "value")


def error_bound(d: int) -> float:
    """Bound on |float32 cosine - float64 cosine| of two length-d float32 vectors."""
    return 3.0 * (d + 4) * _U


@dataclass
class Lists:
    """Ranked lists, one per row (a neuron): flat neuron ids and float64 scores, best first.
    Row r holds ``ids[r, :length[r]]``; the rest is padding (-1, nan)."""

    ids: np.ndarray  # [rows, keep] int32
    scores: np.ndarray  # [rows, keep] float64
    length: np.ndarray  # [rows] int32

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.length[r])
        return self.ids[r, :n], self.scores[r, :n]


def _finish(ids: np.ndarray, s32: np.ndarray, s64: np.ndarray, threshold: np.ndarray, keep: int) -> Lists:
    """Sort each row's candidates by (float64 score desc, id) and keep the trusted head (s64 > threshold)."""
    order = np.lexsort((ids, -s64), axis=-1)
    ids = np.take_along_axis(ids, order, axis=1)
    s64 = np.take_along_axis(s64, order, axis=1)
    trusted = (s64 > threshold[:, None]).sum(axis=1)  # a prefix: s64 is sorted
    length = np.minimum(trusted, keep).astype(np.int32)
    width = min(keep, ids.shape[1])
    out_ids = np.where(np.arange(width)[None, :] < length[:, None], ids[:, :width], -1).astype(np.int32)
    out_s = np.where(np.arange(width)[None, :] < length[:, None], s64[:, :width], np.nan)
    return Lists(out_ids, out_s, length)


def _rows_dot(V: np.ndarray, ids: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """[rows, c] float64: V[ids[r, j]] . Q[r], in chunks (a batched matrix-vector product)."""
    Vt = torch.from_numpy(np.ascontiguousarray(V))
    Qt = torch.from_numpy(np.ascontiguousarray(Q, dtype=np.float64))
    idt = torch.from_numpy(ids.astype(np.int64))
    out = torch.empty(ids.shape, dtype=torch.float64)
    step = max(1, (1 << 24) // max(ids.shape[1] * V.shape[1], 1))
    for a in range(0, ids.shape[0], step):
        vecs = Vt[idt[a:a + step]].double()  # [t, c, d]
        out[a:a + step] = torch.bmm(vecs, Qt[a:a + step, :, None]).squeeze(2)
    return out.numpy()


def similar_lists(vectors: torch.Tensor, *, keep: int = 50, candidates: int = 64, block: int | None = None) -> Lists:
    """For each row of ``vectors`` [N, d] (float32, as stored), the other rows with the highest cosine."""
    V = vectors.detach().float()
    n, d = V.shape
    c = min(max(candidates, keep), n - 1)
    if c <= 0:
        return Lists(np.full((n, 0), -1, np.int32), np.full((n, 0), np.nan), np.zeros(n, np.int32))
    block = block or max(64, (1 << 26) // n)  # a [block, N] float32 product of at most 256 MB
    unit = V / V.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    ids = np.empty((n, c), dtype=np.int32)
    s32 = np.empty((n, c), dtype=np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        sims = unit[a:b] @ unit.T  # [B, N]
        sims[torch.arange(b - a), torch.arange(a, b)] = -torch.inf  # not its own neighbour
        top = torch.topk(sims, c, dim=1, sorted=True)
        ids[a:b] = top.indices.cpu().numpy()
        s32[a:b] = top.values.cpu().numpy()
    V64 = V.cpu().numpy().astype(np.float64)
    U64 = V64 / np.maximum(np.linalg.norm(V64, axis=1, keepdims=True), 1e-300)
    s64 = _rows_dot(U64, ids, U64)
    threshold = (s32[:, -1].astype(np.float64) + error_bound(d)) if c < n - 1 else np.full(n, -np.inf)
    return _finish(ids, s32, s64, threshold, keep)
