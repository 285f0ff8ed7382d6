"""One forward pass over a corpus serving every layer at once: trigger prefixes and activation statistics.

The memory coefficient of neuron i at a position is the MLP's hidden activation there, read as
the input of the value projection (c_proj / dense_4h_to_h / fc2 / down_proj) by a forward
pre-hook; for gated models that input is silu(x.g_i) * (x.u_i). Per layer the hook folds the
batch into a running top-N per neuron that lives on the model's device (Neuroscope's MaxStore):
per-document maxima first, then one sort over the union of kept and new candidates. Nothing per
token is kept for the whole corpus.

Terms (document, window, prefix): see catalog/extract/windows.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from catalog.extract.fold import count_positive, fold, merge_top
from catalog.extract.hooks import backbone, capture_coefficients, capture_outputs, pad_rows
from catalog.extract.states import FiringStats, RunningStats, TopState, masked_extremes
from catalog.extract.windows import TokenisedCorpus

if TYPE_CHECKING:
    from catalog.extract.ablation import StartCache


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    counted: torch.Tensor  # [batch, pos] bool: a document token the window counts (not BOS, context or padding)
    windows: list[int]  # index into TokenisedCorpus.windows of each row
    doc_of_row: torch.Tensor  # [batch] index of each row's document among the batch's documents
    n_docs: int
    doc_slots: list[int]  # tokenised-document slot of each of the batch's documents

    @property
    def n_tokens(self) -> int:
        return int(self.counted.sum())


def batches(corpus: TokenisedCorpus, *, batch_tokens: int, pad: int, device: torch.device) -> Iterator[Batch]:
    """Pack whole documents (all their windows) into right-padded batches, longest first.

    Right padding keeps every real position exact in a causal model (and in an encoder, whose
    attention mask hides the padding). Keeping a document's windows in one batch lets per-document
    maxima be taken before the top-N merge.
    """
    lead = [corpus.bos] if corpus.bos is not None else []
    tail = [corpus.sep] if corpus.sep is not None else []
    order = sorted(range(len(corpus.tokens)), key=lambda s: (-min(len(corpus.tokens[s]), corpus.chunk), s))
    pending: list[int] = []
    width = 0

    def make(slots: list[int]) -> Batch:
        rows: list[list[int]] = []
        win_ids: list[int] = []
        doc_of_row: list[int] = []
        contexts: list[int] = []
        for j, slot in enumerate(slots):
            n_win = corpus.n_windows(slot)
            for w in range(corpus.first_window[slot], corpus.first_window[slot] + n_win):
                rows.append(lead + corpus.windows[w].tokens + tail)
                contexts.append(corpus.windows[w].context)
                win_ids.append(w)
                doc_of_row.append(j)
        ids, mask = pad_rows(rows, pad, device)
        counted = mask.bool().clone()
        if lead:
            counted[:, 0] = False
        for row, c in enumerate(contexts):  # an overlapping window's leading context was counted before
            if c:
                counted[row, len(lead) : len(lead) + c] = False
        if tail:  # each row's last real token
            counted[torch.arange(len(rows), device=device), mask.sum(dim=1) - 1] = False
        return Batch(ids, mask, counted, win_ids, torch.tensor(doc_of_row, device=device), len(slots), slots)

    rows_pending = 0
    for slot in order:
        n_win = corpus.n_windows(slot)
        w = min(len(corpus.tokens[slot]), corpus.chunk) + len(lead) + len(tail)
        new_width = max(width, w)
        # a new batch when this one is full, or when the document is under half its width (at most
        # half of any row is padding, whatever mix of lengths a shard holds)
        if pending and ((rows_pending + n_win) * new_width > batch_tokens or 2 * w < width):
            yield make(pending)
            pending, rows_pending, new_width = [], 0, w
        pending.append(slot)
        rows_pending += n_win
        width = new_width
    if pending:
        yield make(pending)


def batch_candidates(
    coeffs: torch.Tensor, best: torch.Tensor, at: torch.Tensor, batch: Batch, corpus: TokenisedCorpus, lead: int,
    *, sign: int = 1,
) -> TopState:
    """Per-document extremes of one batch as a TopState of [d_mlp, n_docs] candidates.

    best/at: each row's extreme coefficient and its index (from ``masked_extremes``); values are stored
    multiplied by ``sign`` so that larger is always stronger.
    """
    prev_idx = at - 1  # BOS (index 0) when the trigger is the window's first token
    prev = coeffs.gather(1, prev_idx.clamp(min=0).unsqueeze(1)).squeeze(1)
    prev = torch.where(prev_idx >= 0, prev, torch.full_like(prev, math.nan))
    if not corpus.causal:  # an encoder's neighbour saw the trigger too: it is no prefix without it
        prev = torch.full_like(prev, math.nan)
    best = best * sign
    starts = torch.tensor([corpus.windows[w].start for w in batch.windows], device=coeffs.device)
    pos = at - lead + starts.unsqueeze(1)  # position in the document
    d_mlp = coeffs.shape[2]
    docs_idx = torch.tensor([corpus.documents[s] for s in batch.doc_slots], device=coeffs.device)
    if batch.n_docs == coeffs.shape[0]:  # one window per document: rows are documents
        values, positions, previous = best, pos, prev
    else:
        values = torch.full((batch.n_docs, d_mlp), -math.inf, device=coeffs.device)
        positions = torch.zeros((batch.n_docs, d_mlp), dtype=torch.long, device=coeffs.device)
        previous = torch.full((batch.n_docs, d_mlp), math.nan, device=coeffs.device)
        # Rows of a document are consecutive and in window order; a strict '>' keeps the earliest window on ties.
        for row in range(coeffs.shape[0]):
            j = int(batch.doc_of_row[row])
            better = best[row] > values[j]
            values[j] = torch.where(better, best[row], values[j])
            positions[j] = torch.where(better, pos[row], positions[j])
            previous[j] = torch.where(better, prev[row], previous[j])
    # Transposed views: the merge's torch.cat copies them anyway.
    return TopState(values.T, docs_idx.unsqueeze(0).expand(d_mlp, -1), positions.T, previous.T)


@dataclass
class PassResult:
    """Per layer: statistics and top-N states (signs +1 and, for gated models, -1)."""

    stats: list[RunningStats]
    firing: list[FiringStats]
    top: list[TopState]
    bottom: list[TopState] | None
    tokens: int = 0
    seconds: float = 0.0


def corpus_pass(
    model: nn.Module,
    value_projs: Sequence[nn.Module],
    corpus: TokenisedCorpus,
    *,
    top_n: int,
    gated: bool,
    batch_tokens: int,
    pad: int,
    key_projs: Sequence[nn.Module] | None = None,
    progress: Callable[[int], None] | None = None,
    firing: bool = True,
    starts: StartCache | None = None,
    compiled: bool = True,
) -> PassResult:
    """Run the model once over the corpus and fold every layer's coefficients into top-N and stats;
    ``starts`` (a causal model) keeps each window's start for the random ablation. On CPU the fold is
    ``fold.py``'s compiled loops (``compiled=False``: the torch operations the CUDA path runs)."""
    import time

    device = next(model.parameters()).device
    d_mlp = _d_mlp(value_projs[0])
    n_layers = len(value_projs)
    lead = 1 if corpus.bos is not None else 0
    stats = [RunningStats.empty(d_mlp, device) for _ in range(n_layers)]
    # firing=False leaves the |coefficient| histogram out (bench/part2_corpus_pass.py measures its cost)
    fire = [FiringStats.empty(d_mlp, device) for _ in range(n_layers)]
    top = [TopState.empty(d_mlp, top_n, device) for _ in range(n_layers)]
    bottom = [TopState.empty(d_mlp, top_n, device) for _ in range(n_layers)] if gated else None
    shape = [0, 0]
    current: list[Batch] = []

    def on_layer(layer: int, coeffs: torch.Tensor) -> None:
        batch = current[0]
        if compiled and coeffs.device.type == "cpu":  # the compiled read of the coefficients (fold.py)
            f = fold(coeffs, batch.counted, lowest=bottom is not None, histogram=firing)
            if f.count:
                stats[layer].absorb(RunningStats(f.mean, f.m2, f.positive, f.best.max(0).values.double(), f.count))
            if f.hist is not None:
                fire[layer].add_histogram(f.hist, f.count)
            merge_top(top[layer], batch_candidates(coeffs, f.best, f.at, batch, corpus, lead))
            if bottom is not None:
                assert f.low is not None and f.low_at is not None
                merge_top(bottom[layer], batch_candidates(coeffs, f.low, f.low_at, batch, corpus, lead, sign=-1))
            return
        coeffs = coeffs.float()
        # one masked copy serves the maxima, the |coefficient| histogram and (refilled) the minima;
        # torch.where with a scalar is about 2x faster than masked_fill for it on CPU
        keep = batch.counted.unsqueeze(-1)
        masked = torch.where(keep, coeffs, -math.inf)
        best, at = masked_extremes(masked)
        stats[layer].update(coeffs, batch.counted, best)
        if firing:
            fire[layer].add_masked(masked, batch.counted)
        top[layer] = top[layer].merge(batch_candidates(coeffs, best, at, batch, corpus, lead))
        if bottom is not None:
            masked.masked_fill_(~keep, math.inf)
            low, low_at = masked_extremes(masked, lowest=True)
            bottom[layer] = bottom[layer].merge(batch_candidates(coeffs, low, low_at, batch, corpus, lead, sign=-1))

    def on_preactivation(layer: int, pre: torch.Tensor) -> None:
        if compiled and pre.device.type == "cpu":
            fire[layer].gate_open += count_positive(pre, current[0].counted)
        else:
            fire[layer].add_preactivation(pre.float(), current[0].counted)

    t0 = time.perf_counter()
    tokens = 0
    body = backbone(model)
    with torch.inference_mode(), capture_coefficients(value_projs, on_layer, shape), \
            capture_outputs(key_projs or [], on_preactivation, shape):
        for batch in batches(corpus, batch_tokens=batch_tokens, pad=pad, device=device):
            shape[:] = list(batch.input_ids.shape)
            current[:] = [batch]
            if starts is not None and corpus.causal and not starts.full:
                out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True)
                starts.keep(out.past_key_values, batch.windows, corpus, lead)
                del out
            else:
                body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += batch.n_tokens
            if progress is not None:
                progress(batch.n_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return PassResult(stats, fire, top, bottom, tokens, time.perf_counter() - t0)


def _d_mlp(value_proj: nn.Module) -> int:
    # nn.Linear weight is [out, in]; GPT-2's Conv1D is [in, out].
    weight: torch.Tensor = value_proj.weight  # type: ignore[assignment]
    return int(weight.shape[0] if type(value_proj).__name__ == "Conv1D" else weight.shape[1])


def plain_pass(
    model: nn.Module, corpus: TokenisedCorpus, *, batch_tokens: int, pad: int, head: bool = True
) -> tuple[int, float]:
    """The same batches through the model with no hooks: the baseline of the corpus-pass benchmark.

    ``head=False`` runs the backbone only, as the corpus pass does.
    """
    import time

    device = next(model.parameters()).device
    tokens = 0
    body = model if head else backbone(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(corpus, batch_tokens=batch_tokens, pad=pad, device=device):
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += batch.n_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0
