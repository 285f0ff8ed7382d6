"""Trigger prefixes after the corpus pass: their table, prefix ablation and key-value agreement (seed 001).

Every (document, position) that is some neuron's trigger becomes one *prefix*, shared by all the
neurons it triggers. Ablations re-run the model on shortened prefixes, batched, and read each
neuron's coefficient at the prefix's last token:

- ``last``: the last token removed. It costs nothing: the coefficient one position earlier in the
  same forward pass (kept by the corpus pass as ``TopState.previous``).
- ``first``: the window's first token removed. One forward pass per window serves every prefix in it.
- ``random``: one token other than the last removed, uniformly at random. Each window draws a
  decreasing chain of indices from a generator seeded with (seed, document, window start):
  r1 uniform over the first T - 1 of its T tokens, then r2 uniform below r1, r3 below r2, ... down
  to 0. A prefix of length L loses the first r in the chain with r <= L - 2. Conditioned on
  landing there, each draw is uniform over a range that covers 0..L-2, so for one prefix the removed
  token is uniform over its first L - 1 tokens; and every prefix that loses the same r shares one
  forward pass, whose length halves down the chain: about 2 T tokens per window in all, where
  one pass per prefix would cost about T^2 / 2. Those sequences start with the window's own tokens
  up to the removed index, so (``shares_starts``) one pass over the longest such start per window
  keeps its keys and values, and each sequence runs only from its removed index on, reading the
  rest from that cache: about 1.5 T tokens per window (the suffixes telescope to T). Where the
  corpus pass ran in the same process, it kept those starts (``StartCache``), and the sequences run
  only from their removed index: about T tokens per window.

A single-token prefix has nothing left to ablate: its ablated coefficients are NaN (stored null).

Each trigger's figure is the relative change (a' - a) / max(|a|, s), s the neuron's typical trigger
coefficient (``relative_change``); a neuron's ``ablation_*`` is its mean over the neuron's triggers,
a layer's ``mean_ablation_*`` the median over every trigger of the layer (robust to one outlier).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from catalog import vocab
from catalog.extract.hooks import backbone, capture_coefficients, pad_rows
from catalog.extract.states import TopState
from catalog.extract.windows import TokenisedCorpus

ABLATIONS = vocab.ABLATIONS  # kinds of prefix ablation: last, first, random


@dataclass
class PrefixTable:
    """Unique trigger prefixes of a pass and, per layer, which prefix each neuron's trigger is."""

    slots: torch.Tensor  # [P] tokenised-document slot
    documents: torch.Tensor  # [P] corpus document index
    positions: torch.Tensor  # [P] position among the document's tokens
    top_ids: list[torch.Tensor]  # per layer [d_mlp, N] prefix id, -1 = no trigger
    bottom_ids: list[torch.Tensor] | None

    def __len__(self) -> int:
        return int(self.slots.shape[0])


def prefix_table(corpus: TokenisedCorpus, top: Sequence[TopState], bottom: Sequence[TopState] | None) -> PrefixTable:
    doc_index = torch.tensor(corpus.documents, dtype=torch.long)
    stride = max((len(t) for t in corpus.tokens), default=1) + 1
    states = list(top) + (list(bottom) if bottom is not None else [])
    keys = []
    for s in states:
        docs, pos = s.documents.cpu(), s.positions.cpu()
        slot = torch.searchsorted(doc_index, docs.clamp(min=0))  # corpus.documents is ascending
        keys.append(torch.where(docs >= 0, slot * stride + pos, torch.full_like(docs, -1)))
    flat = torch.cat([k.flatten() for k in keys]) if keys else torch.empty(0, dtype=torch.long)
    unique, inverse = torch.unique(flat, return_inverse=True)
    if unique.numel() and unique[0] < 0:  # the empty-slot key sorts first
        unique, inverse = unique[1:], inverse - 1
    ids = [part.view_as(k) for part, k in zip(inverse.split([k.numel() for k in keys]), keys, strict=True)]
    slots, positions = unique // stride, unique % stride
    n_top = len(top)
    return PrefixTable(
        slots, doc_index[slots], positions, ids[:n_top], ids[n_top:] if bottom is not None else None
    )


def prefix_texts(corpus: TokenisedCorpus, table: PrefixTable, tokenizer: object) -> list[str]:
    """Decoded prefix of each entry: its window's tokens up to and including the trigger token."""
    seqs = []
    for slot, pos in zip(table.slots.tolist(), table.positions.tolist(), strict=True):
        start = corpus.windows[corpus.window_of(slot, pos)].start
        seqs.append(corpus.tokens[slot][start : pos + 1])
    return tokenizer.batch_decode(seqs, skip_special_tokens=False)  # type: ignore[attr-defined,no-any-return]


def token_at(corpus: TokenisedCorpus, table: PrefixTable, offset: int) -> torch.Tensor:
    """Token id at position + offset of each prefix's document; -1 outside the document."""
    out = []
    for slot, pos in zip(table.slots.tolist(), table.positions.tolist(), strict=True):
        toks = corpus.tokens[slot]
        at = pos + offset
        # just past a document that --max-tokens cut, the token that follows is known: not an end
        out.append(toks[at] if 0 <= at < len(toks) else corpus.cut_next.get(slot, -1) if at == len(toks) else -1)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class AblationJob:
    """Sequences to run (document tokens, no BOS) and, per sequence, (prefix id, index in the sequence)."""

    rows: list[list[int]]
    reads: list[list[tuple[int, int]]]
    # prefixes whose sequence is the start of the 'first' job's sequence for their window (the random
    # removal hit index 0): read from that job's run instead of running the same tokens again
    from_first: list[int] = field(default_factory=list)
    # per row (random job only): its window, and how many of its leading tokens are the window's own
    # (the removed index): rows of a window share those tokens' keys and values (run_ablation)
    window: list[int] | None = None
    kept: list[int] | None = None
    # per window of ``window``: its (document, start), the key of a StartCache
    origin: dict[int, tuple[int, int]] = field(default_factory=dict)

    def longest_starts(self) -> dict[int, int]:
        """Per window of ``window``: its rows' longest kept start."""
        assert self.window is not None and self.kept is not None
        starts: dict[int, int] = {}
        for w, k in zip(self.window, self.kept, strict=True):
            starts[w] = max(starts.get(w, 0), k)
        return starts

    def cached(self, starts: StartCache | None, lead: int) -> set[int]:
        """The windows whose longest start ``starts`` holds (none without it)."""
        if starts is None or self.window is None:
            return set()
        return {w for w, k in self.longest_starts().items() if starts.covers(self.origin[w], lead + k)}

    def tokens(self, shared: bool, cached: set[int] | frozenset[int] = frozenset()) -> int:
        """Tokens the forward passes run, BOS not counted: every row in full, or (``shared``) each
        window's longest kept start once (none for a ``cached`` window) and every row from its
        removed index on."""
        if not shared or self.window is None or self.kept is None:
            return sum(len(r) for r in self.rows)
        starts = self.longest_starts()
        return (sum(k for w, k in starts.items() if w not in cached)
                + sum(len(r) - k for r, k in zip(self.rows, self.kept, strict=True)))


class StartCache:
    """Keys and values of each window's start, kept by the corpus pass for the random ablation.

    A random-removal row of a window begins with the window's own tokens up to its removed index,
    at most the chain's first index r1 (``random_chain``: known before any trigger is). The corpus
    pass runs every window in full anyway, so it can keep the keys and values of its first
    lead + r1 positions; ``_run_from_starts`` then reads them instead of running the starts again.
    Kept on the model's device, packed per layer as [positions, kv heads, head dim], up to
    ``budget_bytes`` (windows past it are not kept and run their starts as before). Only for a
    causal model whose cache may be cut (``shares_starts``), in the process that runs both."""

    def __init__(self, seed: int, budget_bytes: int) -> None:
        self.seed, self.budget_bytes = seed, budget_bytes
        self.used = 0
        self.full = False
        self._chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per batch, per layer
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._where: dict[tuple[int, int], tuple[int, int]] = {}  # (document, start) -> (offset, positions)
        self._size = 0  # positions kept

    def __len__(self) -> int:
        return len(self._where)

    def covers(self, origin: tuple[int, int], positions: int) -> bool:
        got = self._where.get(origin)
        return got is not None and got[1] >= positions

    def keep(self, past: Any, windows: Sequence[int], corpus: TokenisedCorpus, lead: int) -> None:
        """Keep, from one corpus-pass batch's cache (rows = ``windows``, right-padded), each window's
        first lead + r1 positions."""
        if self.full:
            return
        if past is None:  # a model that keeps no cache
            self.full = True
            return
        if self._packed is not None:  # read already (a shard after an ablation shard): pack again on the next read
            self._chunks, self._packed = [list(self._packed)], None
        kv = [(k, v) for k, v, *_ in past]
        k0 = kv[0][0]
        if any(k.shape[0] != len(windows) or k.shape[2] != k0.shape[2] for k, _ in kv):
            self.full = True  # not one entry per row and position (a cache of another kind): keep nothing more
            return
        per_position = sum(k.shape[1] * k.shape[3] * (k.element_size() + v.element_size()) for k, v in kv)
        wanted: list[int] = []
        for w in windows:
            win = corpus.windows[w]
            chain = random_chain(self.seed, win.document, win.start, len(win.tokens))
            n = lead + chain[0] if chain and chain[0] > 0 else 0  # r1 = 0: its rows all read the 'first' run
            if n and self.used + n * per_position > self.budget_bytes:
                self.full = True
            wanted.append(0 if self.full else n)
            self.used += wanted[-1] * per_position
        if not any(wanted):
            return
        n_rows = torch.tensor(wanted, device=k0.device)
        mask = torch.arange(k0.shape[2], device=k0.device)[None, :] < n_rows[:, None]  # [B, W]
        # [B, H, W, D] -> the kept positions, row by row: [n, H, D]
        self._chunks.append([(k.transpose(1, 2)[mask], v.transpose(1, 2)[mask]) for k, v in kv])
        for w, n in zip(windows, wanted, strict=True):
            if n:
                win = corpus.windows[w]
                self._where[(win.document, win.start)] = (self._size, n)
                self._size += n

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._packed is None:  # one tensor per layer, a layer at a time (the peak: one layer's copy)
            packed = []
            for layer in range(len(self._chunks[0]) if self._chunks else 0):
                packed.append((torch.cat([c[layer][0] for c in self._chunks]),
                               torch.cat([c[layer][1] for c in self._chunks])))
                for c in self._chunks:
                    c[layer] = (c[layer][0][:0], c[layer][1][:0])
            self._chunks = []
            self._packed = packed
        return self._packed

    def past(self, origins: Sequence[tuple[int, int]], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [B, H, width, D] of the starts of ``origins``, each covering at
        least its row's positions; positions past a start's own repeat its last one (masked)."""
        layers = self._layers()
        device = layers[0][0].device
        offsets = torch.tensor([self._where[o][0] for o in origins], device=device)
        ends = torch.tensor([self._where[o][0] + self._where[o][1] - 1 for o in origins], device=device)
        idx = torch.minimum(offsets[:, None] + torch.arange(width, device=device)[None, :], ends[:, None]).reshape(-1)
        B = len(origins)
        return [(k.index_select(0, idx).view(B, width, *k.shape[1:]).transpose(1, 2),
                 v.index_select(0, idx).view(B, width, *v.shape[1:]).transpose(1, 2)) for k, v in layers]

    def clear(self) -> None:
        self._chunks, self._packed, self._where = [], None, {}
        self.used = self._size = 0
        self.full = False


def random_chain(seed: int, document: int, window_start: int, n_tokens: int) -> list[int]:
    """The window's decreasing chain of candidate removal indices (module docstring, ``random``)."""
    rng = np.random.default_rng([seed, document, window_start])
    chain: list[int] = []
    bound = n_tokens - 1
    while bound > 0:
        bound = int(rng.integers(bound))
        chain.append(bound)
    return chain


def random_removed(chain: Sequence[int], length: int) -> int:
    """Index (within the window) of the token a prefix of ``length`` >= 2 tokens loses."""
    return next(r for r in chain if r <= length - 2)


def ablation_jobs(corpus: TokenisedCorpus, table: PrefixTable, prefix_ids: torch.Tensor, *, seed: int) -> dict[str, AblationJob]:
    """The 'first' and 'random' ablation sequences for the prefixes in ``prefix_ids`` (-1 ignored)."""
    wanted = torch.unique(prefix_ids[prefix_ids >= 0]).tolist()
    first: dict[int, list[tuple[int, int]]] = {}  # window -> reads
    random: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (window, removed index) -> reads
    chains: dict[int, list[int]] = {}
    jobs_from_first: list[int] = []
    for pid in wanted:
        slot, pos = int(table.slots[pid]), int(table.positions[pid])
        w = corpus.window_of(slot, pos)
        win = corpus.windows[w]
        length = pos - win.start + 1
        if length < 2:
            continue
        first.setdefault(w, []).append((pid, length - 2))
        if w not in chains:
            chains[w] = random_chain(seed, win.document, win.start, len(win.tokens))
        removed = random_removed(chains[w], length)
        if removed == 0:
            # the same tokens as this window's 'first' sequence (which runs to its last read): the same coefficients
            jobs_from_first.append(pid)
        else:
            random.setdefault((w, removed), []).append((pid, length - 2))
    jobs = {"first": AblationJob([], []), "random": AblationJob([], [], jobs_from_first, [], [])}
    for w, reads in first.items():
        end = max(i for _, i in reads) + 2
        jobs["first"].rows.append(corpus.windows[w].tokens[1:end])
        jobs["first"].reads.append(reads)
    for (w, r), reads in random.items():
        win = corpus.windows[w]
        end = max(i for _, i in reads) + 2
        jobs["random"].rows.append(win.tokens[:r] + win.tokens[r + 1 : end])
        jobs["random"].reads.append(reads)
        jobs["random"].window.append(w)  # type: ignore[union-attr]
        jobs["random"].kept.append(r)  # type: ignore[union-attr]
        jobs["random"].origin[w] = (win.document, win.start)
    return jobs


def shares_starts(model: nn.Module) -> bool:
    """Whether a row may read its window's start from a cache (run_ablation). Not with a sliding
    window: its cache keeps only the last tokens, so a slice of it is not the start."""
    config = getattr(model, "config", None)
    return not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False


def run_ablation(
    model: nn.Module,
    value_projs: Sequence[nn.Module],
    job: AblationJob,
    prefix_ids: Sequence[torch.Tensor],
    *,
    n_prefixes: int,
    bos: int | None,
    pad: int,
    batch_tokens: int,
    progress: Callable[[int], None] | None = None,
    starts: StartCache | None = None,
) -> list[torch.Tensor]:
    """Per layer [d_mlp, N]: each trigger's coefficient on its ablated prefix (NaN where there is none).

    Rows run longest first, in batches of about ``batch_tokens`` (padding included). A job with
    ``kept`` runs, where the model allows it (``shares_starts``), its windows' starts once and each
    row from its removed index on (``_run_from_starts``), reading the starts ``starts`` holds from it."""
    device = next(model.parameters()).device
    lead = [bos] if bos is not None else []
    ids_dev = [p.to(device) for p in prefix_ids]
    out = [torch.full(p.shape, math.nan, device=device) for p in prefix_ids]
    neuron_idx = [torch.arange(p.shape[0], device=device).unsqueeze(1).expand_as(p) for p in prefix_ids]
    loc = torch.full((n_prefixes,), -1, dtype=torch.long, device=device)
    shape = [0, 0]

    def on_layer(layer: int, coeffs: torch.Tensor) -> None:
        ids = ids_dev[layer]
        at = torch.where(ids >= 0, loc[ids.clamp(min=0)], -1)
        hit = at >= 0
        flat = coeffs.reshape(-1, coeffs.shape[-1]).float()
        out[layer][hit] = flat[at[hit], neuron_idx[layer][hit]]

    def read_at(rows: Sequence[int], width: int, offsets: Sequence[int]) -> None:
        """Point each read prefix of ``rows`` (the batch's rows, in order) at its flat position."""
        loc.fill_(-1)
        pid, flat_at = [], []
        for row, (j, off) in enumerate(zip(rows, offsets, strict=True)):
            for p, t in job.reads[j]:
                pid.append(p)
                flat_at.append(row * width + t + off)
        loc[torch.tensor(pid, device=device, dtype=torch.long)] = torch.tensor(flat_at, device=device, dtype=torch.long)

    body = backbone(model)
    with torch.inference_mode(), capture_coefficients(value_projs, on_layer, shape):
        if job.kept is not None and job.window is not None and shares_starts(model):
            _run_from_starts(body, job, lead, pad, batch_tokens, device, shape, loc, read_at, progress, starts)
        else:
            order = sorted(range(len(job.rows)), key=lambda i: -len(job.rows[i]))
            for chunk in _batches(order, lambda j: len(job.rows[j]) + len(lead), batch_tokens):
                ids, mask = pad_rows([lead + job.rows[j] for j in chunk], pad, device)
                shape[:] = list(ids.shape)
                read_at(chunk, ids.shape[1], [len(lead)] * len(chunk))
                body(input_ids=ids, attention_mask=mask, use_cache=False)
                if progress is not None:
                    progress(int(mask.sum()))
    return [o.cpu() for o in out]


def _batches(order: Sequence[int], width_of: Callable[[int], int], batch_tokens: int) -> Iterator[list[int]]:
    """Consecutive batches of ``order`` (longest first) of about ``batch_tokens`` padded positions;
    rows under half the batch's width start the next batch, so at most half of a row is padding."""
    i = 0
    while i < len(order):
        width = width_of(order[i])
        take = max(1, batch_tokens // max(1, width))
        chunk = [j for j in order[i : i + take] if 2 * width_of(j) >= width] or list(order[i : i + 1])
        i += len(chunk)
        yield chunk


def _run_from_starts(body: nn.Module, job: AblationJob, lead: list[int], pad: int, batch_tokens: int,
                     device: torch.device, shape: list[int], loc: torch.Tensor,
                     read_at: Callable[[Sequence[int], int, Sequence[int]], None],
                     progress: Callable[[int], None] | None, starts: StartCache | None = None) -> None:
    """Run ``job``'s rows as (the window's start, from the cache) + (the rest of the row).

    A group of windows runs its starts (lead + the window's first ``max kept`` tokens) once, keeping
    their keys and values; then its rows run, batched, from their removed index on, each over its
    window's cached keys and values cut to the row's kept tokens (the rest masked out), at the
    positions the full row gives them. The coefficients are those of the full rows (float rounding
    aside: tests/test_ablation_starts.py holds them against each row run alone). Every start is
    non-empty: a removal of index 0 is read from the 'first' run (``ablation_jobs``), so kept >= 1.
    The windows whose start ``starts`` holds (kept by the corpus pass) run no start: their rows form
    one group that reads its past from there."""
    assert job.window is not None and job.kept is not None
    kept, n_lead = job.kept, len(lead)
    assert all(k + n_lead > 0 for k in kept), "a row with nothing before its removed index"
    rows_of: dict[int, list[int]] = {}
    for j, w in enumerate(job.window):
        rows_of.setdefault(w, []).append(j)
    start_of = {w: max(rows, key=lambda j: kept[j]) for w, rows in rows_of.items()}  # the row with the longest start
    windows = sorted(rows_of, key=lambda w: -kept[start_of[w]])
    cached = job.cached(starts, n_lead)
    groups = [[w for w in windows if w in cached]] if cached else []
    groups += _batches([w for w in windows if w not in cached], lambda w: kept[start_of[w]] + n_lead, batch_tokens)
    for group in groups:
        from_cache = group[0] in cached
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not from_cache:
            ids, mask = pad_rows([lead + job.rows[start_of[w]][: kept[start_of[w]]] for w in group], pad, device)
            shape[:] = list(ids.shape)
            loc.fill_(-1)  # nothing is read in the starts
            cache = body(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            kv = [(k, v) for k, v, *_ in cache]
            if any(k.shape[-2] != ids.shape[1] for k, _ in kv):
                raise RuntimeError("the key-value cache does not hold every start position")
            if progress is not None:
                progress(int(mask.sum()))
        slot = {w: i for i, w in enumerate(group)}
        rows = sorted((j for w in group for j in rows_of[w]), key=lambda j: -(len(job.rows[j]) - kept[j]))
        i = 0
        while i < len(rows):
            # a batch of rows: past width P (the longest kept start) + suffix width S, B (P + S) <= batch_tokens
            S = len(job.rows[rows[i]]) - kept[rows[i]]
            chunk: list[int] = []
            P = 0
            for j in rows[i:]:
                p = max(P, kept[j] + n_lead)
                if chunk and ((len(chunk) + 1) * (p + S) > batch_tokens or 2 * (len(job.rows[j]) - kept[j]) < S):
                    break
                chunk.append(j)
                P = p
            i += len(chunk)
            B = len(chunk)
            if from_cache:
                assert starts is not None
                past = DynamicCache(starts.past([job.origin[job.window[j]] for j in chunk], P))
            else:
                which = torch.tensor([slot[job.window[j]] for j in chunk], device=device)
                past = DynamicCache([(k[:, :, :P].index_select(0, which), v[:, :, :P].index_select(0, which))
                                     for k, v in kv])
            suffix, smask = pad_rows([job.rows[j][kept[j]:] for j in chunk], pad, device)
            begins = torch.tensor([kept[j] + n_lead for j in chunk], device=device)
            lengths = smask.sum(1)
            mask2 = torch.cat([(torch.arange(P, device=device) < begins[:, None]).long(), smask], dim=1)
            # the full row's positions; padding repeats the row's last position
            steps = torch.minimum(torch.arange(S, device=device)[None, :], (lengths - 1)[:, None])
            shape[:] = [B, S]
            read_at(chunk, S, [-kept[j] for j in chunk])
            body(input_ids=suffix, attention_mask=mask2, position_ids=begins[:, None] + steps, past_key_values=past,
                 use_cache=True)
            if progress is not None:
                progress(int(smask.sum()))


def read_from_first(random: list[torch.Tensor], first: list[torch.Tensor], job: AblationJob,
                    prefix_ids: Sequence[torch.Tensor]) -> None:
    """Fill the random ablation's coefficients of ``job.from_first`` (per layer [d_mlp, N], as
    :func:`run_ablation` returns them) from the 'first' ablation's, which ran the same tokens."""
    shared = torch.tensor(job.from_first, dtype=torch.long)
    if len(shared):
        for layer, ids in enumerate(prefix_ids):
            same = torch.isin(ids, shared)
            random[layer][same] = first[layer][same]


def relative_change(original: torch.Tensor, ablated: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(a' - a) / max(|a|, s) per trigger [d_mlp, N], float64.

    ``scale`` [d_mlp] is the neuron's typical trigger coefficient s (``labels.typical_coefficient``: the
    median of its trigger coefficients). Dividing by |a| alone let one trigger with a near-zero
    coefficient (0.0004 on SmolLM2 28/678) turn a modest change into 10^5 and wreck every mean above
    it; with the floor s such a trigger's change is measured in the neuron's own units, while triggers
    with |a| >= s (most of them) keep seed 001's (a' - a) / |a|. NaN where a or a' is missing, or the
    neuron has no typical coefficient (s not positive: it does not fire on the corpus)."""
    a, b = original.double(), ablated.double()
    s = scale.double().reshape(-1, *([1] * (a.dim() - 1))) if a.dim() > 1 else scale.double()
    denom = torch.maximum(a.abs(), s)  # NaN where s is NaN
    rel = (b - a) / denom
    return torch.where(denom > 0, rel, torch.full_like(rel, math.nan))


def nanmean_rows(x: torch.Tensor) -> torch.Tensor:
    """Mean of each row over its non-NaN entries (NaN for a row with none)."""
    return x.nanmean(dim=1)


def nanmedian_all(x: torch.Tensor) -> float | None:
    """Median (numpy's: the mean of the two middle values) over every non-NaN entry; None if there is none.

    The two middle values come from a partial selection (``np.partition``), not a full sort, and are
    interpolated as ``torch.quantile`` does, so the figure is the same to the last bit.
    """
    v = x.detach().double().reshape(-1).cpu().numpy()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None
    lo, hi = (v.size - 1) // 2, v.size // 2
    middle = np.partition(v, [lo, hi])
    weight = 0.5 if hi > lo else 0.0
    return float(torch.lerp(torch.tensor(middle[lo]), torch.tensor(middle[hi]), weight))
