"""Exact neighbour lists of a run, computed once where the products are already at hand.

- Token lists: for every token t, order (``logit`` v_i . e_t, ``cosine``) and projection convention
  (raw e_t, folded e_t * g), the neurons with the highest score, best first, ties by (layer,
  neuron). Fed layer by layer with the projection stage's V.E^T (``TokenLists.add``): a layer's
  products are compared with each token's current c-th best, so only the few that can still enter
  a list are selected (both orders' entrants found by one nonzero).
- Similar lists: for every neuron and space (key, value), the other neurons with the highest
  cosine, from blocks of the Gram matrix (``similar_lists``).

Candidates are selected in float32; a float32 score is within delta of the float64 one (delta a bound
on float32's dot-product error). Every neuron left out scored at most s_c in float32 (s_c the last
candidate's), so at most s_c + delta in float64, and a candidate above s_c + 2 delta in float32 beats
all of them: the list keeps those. Within the list, scores more than 2 delta apart are ordered
right by float32; runs of closer ones are re-scored in float64 (from the same float32 vectors the
catalog stores, as numpy computes them) and ordered by that, ties by id. So a stored list is exactly
the head of numpy's float64 order. A request whose answer is not inside a list (a layer range
that holds fewer than k of it, or k beyond it) scans instead (catalog/read/vectors.py).

A neuron is named by its flat id ``layer * d_mlp + neuron``, which orders like (layer, neuron).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from catalog.extract.blocks import Scratch, run_blocks

# float32 unit roundoff. A float32 dot product of length d errs by about sqrt(d) u |a| |b| (rounding
# errors add like a random walk; BLAS blocks and fused multiply-adds only shrink them). The bound
# takes 16 times that, plus d u for the rounding of the inputs (e * g, 1/|v|, unit vectors). Higham's
# worst case, d u |a| |b| per product, is rigorous but 24-40x wider at d = 576-1,600: it marked
# most of the top 64 of a SmolLM2 token as near-ties, and re-scoring those cost more than the
# products themselves. So this is a statistical bound, not a proof; tests and bench/part10_lists.py
# hold the lists against numpy.
_U = 2.0 ** -24
SPACES = ("key", "value")
TOKEN_ORDERS = ("logit", "cosine")


def error_bound(d: int) -> float:
    """Bound on |float32 score - float64 score| per unit of |a| |b| for two length-d float32 vectors."""
    return (16.0 * d ** 0.5 + 4.0) * _U


@dataclass
class Lists:
    """Ranked lists, one per row (a token or a neuron): flat neuron ids and scores, best first, ties by
    id. Row r holds ``ids[r, :length[r]]``; the rest is padding (-1, nan). A score is float64 where it
    was re-scored (near-ties) and float32's otherwise: the order is exact, the figure within delta."""

    ids: np.ndarray  # [rows, width] int32
    scores: np.ndarray  # [rows, width] float64
    length: np.ndarray  # [rows] int32

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.length[r])
        return self.ids[r, :n], self.scores[r, :n]


def _pair_dots(A: np.ndarray, i: np.ndarray, B: np.ndarray, j: np.ndarray, chunk: int = 512) -> np.ndarray:
    """float64 A[i[p]] . B[j[p]] for every pair p, a chunk at a time: small enough that the gathered
    rows stay in cache for the product (3x faster than chunks of 65,536 pairs on this CPU). Blocks of
    chunks run in one thread per torch thread (numpy's einsum releases the GIL: 1.6M pairs of
    SmolLM2's shape in 1.35 against 2.55 s on 2 cores), and a float64 operand is not copied again."""
    out = np.empty(len(i), dtype=np.float64)

    def work(lo: int, hi: int, _: None) -> None:
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            out[a:b] = np.einsum("nd,nd->n", A[i[a:b]].astype(np.float64, copy=False),
                                 B[j[a:b]].astype(np.float64, copy=False))

    run_blocks(len(i), 64 * chunk, work, lambda a, b: None)
    return out


def _top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row (unordered): values and column indices. torch.topk: with torch 2.13
    on this 2-core CPU it beats numpy's introselect at every shape the lists use (49,152 x 1,536:
    0.59 against 0.83 s; 1,456 x 46,080: 0.13 against 0.60 s; the token lists of 4 SmolLM2 layers
    9 against 13 s, the same lists)."""
    top = torch.topk(x, k, dim=1, sorted=False)
    return top.values, top.indices


def exact_order(ids: np.ndarray, s32: np.ndarray, delta: np.ndarray, last: np.ndarray, delta_out: np.ndarray,
                keep: int, dot64: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Lists:
    """Order each row's candidates exactly and keep the trusted head (see the module docstring).

    ids, s32, delta: [rows, c] candidates, their float32 scores and the bound on each score's float32
    error; last: [rows] the highest float32 score any non-candidate can have (-inf when there is none)
    and delta_out: [rows] the bound on such a score's error; dot64(rows, ids) -> float64 scores of
    those pairs, called for near-ties only.
    """
    rows, c = ids.shape
    if c == 0:
        return Lists(ids.astype(np.int32), np.zeros((rows, 0)), np.zeros(rows, np.int32))
    order = np.lexsort((ids, -s32), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    s32 = np.take_along_axis(s32, order, axis=1)
    delta = np.take_along_axis(np.broadcast_to(delta, ids.shape), order, axis=1)
    scores = s32.astype(np.float64)
    close = (scores[:, :-1] - scores[:, 1:]) <= delta[:, :-1] + delta[:, 1:]  # float32 may have swapped these
    group = np.concatenate([np.zeros((rows, 1), np.int64), np.cumsum(~close, axis=1)], axis=1)
    tied = np.zeros((rows, c), dtype=bool)
    tied[:, :-1] |= close
    tied[:, 1:] |= close
    r, j = np.nonzero(tied)
    if r.size:
        scores[r, j] = dot64(r, ids[r, j])
        order = np.lexsort((ids, -scores, group), axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        s32 = np.take_along_axis(s32, order, axis=1)
        delta = np.take_along_axis(delta, order, axis=1)
        tied = np.take_along_axis(tied, order, axis=1)
    # The order above is exact among the candidates; a head of it is the head of the whole order when
    # each of its entries provably beats every neuron left out (whose float64 score is <= last + delta).
    low = np.where(tied, scores, s32.astype(np.float64) - delta)  # a lower bound on float64
    safe = low > (last.astype(np.float64) + delta_out)[:, None]
    length = np.where(safe.all(axis=1), c, np.argmin(safe, axis=1))
    length = np.minimum(length, keep).astype(np.int32)
    width = min(keep, c)
    inside = np.arange(width)[None, :] < length[:, None]
    return Lists(np.where(inside, ids[:, :width], -1).astype(np.int32), np.where(inside, scores[:, :width], np.nan),
                 length)


class _Running:
    """Per token, the best ``c`` (neuron id, float32 score) seen so far, [vocab, c]; a layer's scores
    are compared with each token's c-th best, and only the ones at or above it are merged in."""

    def __init__(self, vocab: int, c: int, device: torch.device) -> None:
        self.vocab, self.c = vocab, c
        self.s = torch.empty((vocab, 0), device=device)
        self.ids = torch.empty((vocab, 0), dtype=torch.int32, device=device)
        self.seen = 0

    def add(self, scores: torch.Tensor, first_id: int) -> None:
        """scores [n, vocab] float32 of neurons first_id..first_id+n-1."""
        n, c, dev = scores.shape[0], self.c, scores.device
        self.seen += n
        ids = torch.arange(first_id, first_id + n, dtype=torch.int32, device=dev)
        if self.s.shape[1] == 0:  # the first neurons: each token's best of them (no copy of the transpose)
            vals, idx = _top(scores.T, min(c, n))
            self.s, self.ids = vals, (idx + first_id).to(torch.int32)
            return
        if self.s.shape[1] < c:  # filling up: every neuron so far is a candidate
            both = torch.cat([self.s, scores.T], dim=1)
            both_ids = torch.cat([self.ids, ids.expand(self.vocab, n)], dim=1)
            k = min(c, both.shape[1])
            vals, idx = _top(both, k)
            self.s, self.ids = vals.to(dev), torch.gather(both_ids, 1, idx.to(dev))
            return
        tau = self.s.min(dim=1).values
        nid, tok = torch.nonzero(scores >= tau[None, :], as_tuple=True)  # >= keeps ties; NaN never passes
        self._enter(nid, tok, scores[nid, tok], scores, first_id)

    def threshold(self) -> torch.Tensor | None:
        """Each token's c-th best so far, which a score must reach to enter; None while filling up."""
        return self.s.min(dim=1).values if self.s.shape[1] >= self.c else None

    def enter(self, nid: torch.Tensor, tok: torch.Tensor, vals: torch.Tensor, scores: torch.Tensor,
              first_id: int) -> None:
        """``add`` of ``scores`` [n, vocab] once every token's list is full, given their entrants:
        (neuron nid - first_id, token tok) pairs, neuron-major, whose ``vals`` reach the token's
        ``threshold``."""
        self.seen += scores.shape[0]
        self._enter(nid, tok, vals, scores, first_id)

    def _enter(self, nid: torch.Tensor, tok: torch.Tensor, vals: torch.Tensor, scores: torch.Tensor,
               first_id: int) -> None:
        if tok.numel() == 0:
            return
        c, dev = self.c, self.s.device
        # token-major, ids ascending within a token (a stable sort of the few entrants, not a transpose
        # of the whole [n, vocab] mask)
        order = torch.sort(tok, stable=True).indices
        tok, nid, vals = tok[order], nid[order], vals[order]
        counts = torch.bincount(tok, minlength=self.vocab)
        heavy = counts > c
        if bool(heavy.any()):  # a token with more than c entrants: its c best from its whole column
            rows = torch.nonzero(heavy).squeeze(1)
            top_vals, idx = _top(scores[:, rows].T, c)
            self._merge(rows, top_vals.to(dev), (idx.to(dev) + first_id).to(torch.int32))
            keep = ~heavy[tok]
            nid, tok, vals = nid[keep], tok[keep], vals[keep]
            if tok.numel() == 0:
                return
            counts = counts * ~heavy
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(tok.numel(), device=dev) - starts[tok]
        rows = torch.nonzero(counts).squeeze(1)
        at = torch.full((self.vocab,), -1, dtype=torch.long, device=dev)
        at[rows] = torch.arange(rows.numel(), device=dev)
        width = int(counts.max())
        pad_s = torch.full((rows.numel(), width), -torch.inf, device=dev)
        pad_i = torch.full((rows.numel(), width), -1, dtype=torch.int32, device=dev)
        pad_s[at[tok], slot] = vals
        pad_i[at[tok], slot] = (nid + first_id).to(torch.int32)
        self._merge(rows, pad_s, pad_i)

    def _merge(self, rows: torch.Tensor, s: torch.Tensor, ids: torch.Tensor) -> None:
        both = torch.cat([self.s[rows], s], dim=1)
        both_ids = torch.cat([self.ids[rows], ids], dim=1)
        vals, idx = _top(both, self.c)
        self.s[rows] = vals.to(both.device)
        self.ids[rows] = torch.gather(both_ids, 1, idx.to(both.device))

    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids and float32 scores [vocab, c], and the highest score a non-candidate has (its bound:
        each token's c-th best; -inf when every neuron is a candidate)."""
        s, ids = self.s.cpu().numpy(), self.ids.cpu().numpy()
        last = s.min(axis=1) if self.seen > s.shape[1] else np.full(self.vocab, -np.inf, dtype=np.float32)
        return ids, s, last


class TokenLists:
    """The token lists of one run: ``add`` each layer's products, then ``finish``."""

    def __init__(self, unembedding: torch.Tensor, gain: torch.Tensor | None, d_mlp: int, *,
                 keep: int = 50, candidates: int = 64) -> None:
        E = unembedding.detach().float().cpu().numpy()
        self.E64 = {"raw": E.astype(np.float64)}
        if gain is not None:  # e * g in float64, as the read side folds it
            self.E64["folded"] = E.astype(np.float64) * gain.detach().float().cpu().numpy().astype(np.float64)
        self.vocab, self.d = E.shape
        self.d_mlp, self.keep, self.c = d_mlp, keep, max(candidates, keep)
        self.values: list[np.ndarray] = []  # per layer, float32 as stored: re-scoring near-ties
        self.max_norm = 0.0
        self._running: dict[tuple[str, str], _Running] = {}
        self._scratch = Scratch()  # whole-layer temporaries (cosines, entrant masks)

    def add(self, layer: int, values: torch.Tensor, logits: torch.Tensor, folded: torch.Tensor | None) -> None:
        """values [d_mlp, d] float32; logits [d_mlp, vocab] = values . E^T (folded: . (E * g)^T)."""
        assert layer == len(self.values), "layers in order"
        v = values.detach().float()
        self.values.append(v.cpu().numpy())
        norms = v.norm(dim=1).to(logits.device)
        if norms.numel():
            self.max_norm = max(self.max_norm, float(norms.max()))
        inv = 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny)
        first = layer * self.d_mlp
        for convention in self.E64:
            lg = (logits if convention == "raw" or folded is None else folded).float()
            runs = {o: self._running.setdefault((convention, o), _Running(self.vocab, self.c, lg.device))
                    for o in TOKEN_ORDERS}
            cos = self._scratch.like("cosine", lg)
            torch.mul(lg, inv[:, None], out=cos)
            t_logit, t_cos = runs["logit"].threshold(), runs["cosine"].threshold()
            if t_logit is None or t_cos is None:
                runs["logit"].add(lg, first)
                runs["cosine"].add(cos, first)
                continue
            # One nonzero over both orders' entrants (>= keeps ties; NaN never passes), each order then
            # keeps its own: the same entrants and float32 scores as a pass per order.
            hit, hit_cos = self._scratch.like("hit", lg, torch.bool), self._scratch.like("hit_cosine", lg, torch.bool)
            torch.ge(lg, t_logit[None, :], out=hit)
            torch.ge(cos, t_cos[None, :], out=hit_cos)
            hit |= hit_cos
            nid, tok = torch.nonzero(hit, as_tuple=True)
            for order, scores, tau in (("logit", lg, t_logit), ("cosine", cos, t_cos)):
                vals = scores[nid, tok]
                ok = vals >= tau[tok]
                runs[order].enter(nid[ok], tok[ok], vals[ok], scores, first)

    def finish(self) -> dict[tuple[str, str], Lists]:
        """(convention, order) -> Lists over tokens; scores are logits, or cosines."""
        self._scratch.clear()  # the per-layer temporaries (GPT-2-XL: 1.9 GB) are done with
        V = np.concatenate(self.values)  # [N, d] float32
        norms64 = np.linalg.norm(V.astype(np.float64), axis=1)
        inv64 = 1.0 / np.maximum(norms64, 1e-300)
        bound = error_bound(self.d)
        out = {}
        for (convention, order), run in self._running.items():
            E64 = self.E64[convention]
            e_norm = np.linalg.norm(E64, axis=1)
            ids, s32, last = run.candidates()
            # float32 scores are logits (error <= bound |v| |e|), or logit / |v| (<= bound |e|)
            if order == "logit":
                delta, delta_out = bound * norms64[ids] * e_norm[:, None], bound * self.max_norm * e_norm
            else:
                delta, delta_out = np.broadcast_to(bound * e_norm[:, None], ids.shape), bound * e_norm

            def dot64(r: np.ndarray, i: np.ndarray, E64: np.ndarray = E64, order: str = order) -> np.ndarray:
                s = _pair_dots(V, i, E64, r)
                return s * inv64[i] if order == "cosine" else s

            lists = exact_order(ids, s32, delta, last, delta_out, self.keep, dot64)
            if order == "cosine":  # stored as the cosine itself, comparable across tokens (word forms)
                lists.scores = lists.scores / np.maximum(e_norm, 1e-300)[:, None]
            out[(convention, order)] = lists
        return out


def similar_lists(vectors: torch.Tensor, *, keep: int = 50, candidates: int = 64, block: int | None = None,
                  rows: np.ndarray | None = None) -> Lists:
    """For each row of ``vectors`` [N, d] (float32, as stored), the other rows with the highest cosine.

    ``rows``: list only these rows (flat ids, in this order; row r of the result is ``rows[r]``'s
    list, still over every other row): a block of a run's neurons, or a sample."""
    V = vectors.detach().float()
    n, d = V.shape
    which = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    m = len(which)
    c = min(max(candidates, keep), n - 1)
    if c <= 0:
        return Lists(np.full((m, 0), -1, np.int32), np.full((m, 0), np.nan), np.zeros(m, np.int32))
    unit = V / V.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if rows is None and not unit.is_cuda:
        ids, s32, last = _symmetric_candidates(unit, c, block or _SQUARE_BLOCK)
    else:
        ids, s32, last = _row_candidates(unit, which, c, block or max(64, (1 << 26) // n))
    V64 = V.cpu().numpy().astype(np.float64)
    U64 = V64 / np.maximum(np.linalg.norm(V64, axis=1, keepdims=True), 1e-300)

    def dot64(r: np.ndarray, i: np.ndarray) -> np.ndarray:
        return _pair_dots(U64, i, U64, which[r])

    bound = np.full(m, error_bound(d))
    return exact_order(ids, s32, bound[:, None], last, bound, keep, dot64)


# Square blocks of the Gram matrix: 2,048 x 2,048 float32 (16 MB) stay near the cache and keep the
# product efficient.
_SQUARE_BLOCK = 2048


def _symmetric_candidates(unit: torch.Tensor, c: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's ``c`` best other rows of ``unit`` [N, d] by dot product (unordered), and the highest
    score any row left out can have.

    From the upper half of the Gram matrix only: each block product serves its rows and, transposed,
    its columns, so half the products of :func:`_row_candidates`. A row keeps its best c so far; once
    it has c, only the scores at or above its c-th best are merged in (a comparison, where a full
    selection per block cost as much as the product). Whatever is left out or dropped scored at most
    the c-th best at the time, which is at most the final c-th best (``last``)."""
    n = unit.shape[0]
    best_s = np.full((n, c), -np.inf, dtype=np.float32)
    best_i = np.full((n, c), -1, dtype=np.int64)
    filled = np.zeros(n, dtype=bool)

    def merge_into(rows: np.ndarray, cand_s: np.ndarray, cand_i: np.ndarray) -> None:
        both_s = np.concatenate([best_s[rows], cand_s], axis=1)
        both_i = np.concatenate([best_i[rows], cand_i], axis=1)
        keep = np.argpartition(both_s, both_s.shape[1] - c, axis=1)[:, both_s.shape[1] - c:]
        best_s[rows] = np.take_along_axis(both_s, keep, axis=1)
        best_i[rows] = np.take_along_axis(both_i, keep, axis=1)

    def take(lo: int, r: torch.Tensor, j: torch.Tensor, vals: torch.Tensor, first_col: int) -> None:
        """Merge entrants (row lo + r, column first_col + j, score vals), row-major, into the rows' best."""
        if not len(r):
            return
        r_np, j_np = r.numpy(), j.numpy()
        got, start, count = np.unique(r_np, return_index=True, return_counts=True)
        at = np.arange(len(r_np)) - np.repeat(start, count)
        cand_s = np.full((len(got), int(count.max())), -np.inf, dtype=np.float32)
        cand_i = np.full(cand_s.shape, -1, dtype=np.int64)
        which = np.repeat(np.arange(len(got)), count)
        cand_s[which, at] = vals.numpy()
        cand_i[which, at] = j_np + first_col
        merge_into(got + lo, cand_s, cand_i)

    def fill(lo: int, s: torch.Tensor, first_col: int) -> None:
        """A first block of rows lo..: its best min(c, cols) of every row of s [rows, cols]."""
        hi = lo + s.shape[0]
        ts, ti = _top(s, min(c, s.shape[1]))
        merge_into(np.arange(lo, hi), ts.numpy(), ti.numpy().astype(np.int64) + first_col)
        filled[lo:hi] = np.isfinite(best_s[lo:hi]).all(axis=1)

    def threshold(lo: int, hi: int) -> torch.Tensor:
        return torch.from_numpy(best_s[lo:hi].min(axis=1))

    hit = torch.empty((min(block, n), min(block, n)), dtype=torch.bool)
    hit_cols = torch.empty_like(hit)
    for a in range(0, n, block):
        rows = unit[a:a + block]
        for b in range(a, n, block):
            sims = rows @ unit[b:b + block].T  # [A, B]
            A, B = sims.shape
            if a == b:
                sims.fill_diagonal_(-torch.inf)  # not its own neighbour
                if not filled[a:a + A].all():
                    fill(a, sims, b)
                    continue
            elif not filled[a:a + A].all() or not filled[b:b + B].all():
                for lo, view, first_col in ((a, sims, b), (b, sims.T, a)):
                    if not filled[lo:lo + view.shape[0]].all():
                        fill(lo, view, first_col)
                    else:
                        thr = threshold(lo, lo + view.shape[0])
                        r, j = torch.nonzero(view >= thr[:, None], as_tuple=True)
                        take(lo, r, j, view[r, j], first_col)
                continue
            # the rows' entrants (s >= a row's c-th best) and, transposed, the columns' (s >= a
            # column's), found by one nonzero over both in the block's own layout; the same entrants
            # and order as a pass per side over s and a copy of its transpose
            thr_r = threshold(a, a + A)
            m, m_cols = hit[:A, :B], hit_cols[:A, :B]
            torch.ge(sims, thr_r[:, None], out=m)
            if a != b:
                thr_c = threshold(b, b + B)
                torch.ge(sims, thr_c[None, :], out=m_cols)
                m |= m_cols
            r, j = torch.nonzero(m, as_tuple=True)
            vals = sims[r, j]
            ok = vals >= thr_r[r]
            take(a, r[ok], j[ok], vals[ok], b)
            if a != b:
                ok = vals >= thr_c[j]
                order = torch.sort(j[ok], stable=True).indices  # row-major for the columns, rows ascending
                take(b, j[ok][order], r[ok][order], vals[ok][order], a)
    last = best_s.min(axis=1) if c < n - 1 else np.full(n, -np.inf, dtype=np.float32)
    return best_i.astype(np.int32), best_s, last


def _row_candidates(unit: torch.Tensor, which: np.ndarray, c: int,
                    block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows ``which`` of :func:`_symmetric_candidates`, each scored against every row: a block of
    rows at a time (any subset of rows, and a GPU's form)."""
    n, m = unit.shape[0], len(which)
    ids = np.empty((m, c), dtype=np.int32)
    s32 = np.empty((m, c), dtype=np.float32)
    last = np.empty(m, dtype=np.float32)
    for a in range(0, m, block):
        b = min(m, a + block)
        own = torch.from_numpy(which[a:b]).to(unit.device)
        sims = unit[own] @ unit.T  # [B, N]
        sims[torch.arange(b - a, device=unit.device), own] = -torch.inf  # not its own neighbour
        top_s, top_i = _top(sims, c)
        ids[a:b], s32[a:b] = top_i.cpu().numpy(), top_s.cpu().numpy()
        # every neuron left out scored at most the worst candidate
        last[a:b] = s32[a:b].min(axis=1) if c < n - 1 else -np.inf
    return ids, s32, last
