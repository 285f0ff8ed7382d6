"""One forward pass over a corpus serving every layer at once: trigger prefixes and activation statistics.

The memory coefficient of neuron i at a position is the MLP's hidden activation there, read as
the input of the value projection (c_proj / dense_4h_to_h / fc2 / down_proj) by a forward
pre-hook; for gated models that input is silu(x.g_i) * (x.u_i). Per layer the hook folds the
batch into a running top-N per neuron that lives on the model's device (Neuroscope's MaxStore):
per-document maxima first, then one sort over the union of kept and new candidates. Nothing per
token is kept for the whole corpus.

Terms: a *document* is one corpus unit; documents longer than the window are split into
*windows*, each starting with the run's BOS when it has one (BOS is never counted or a trigger).
Windows after a document's first overlap the one before: each reads ``overlap`` tokens of context
that it does not count, then counts the next ``chunk - overlap``; so every position is counted
exactly once and none beyond the first window has fewer than ``overlap`` tokens before it.
A trigger's *prefix* is its window's tokens up to and including the trigger position. Positions are
0-based among the document's own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from catalog.corpus import Document
from catalog.extract.encoder import frame_tokens


@dataclass(frozen=True)
class Window:
    document: int  # index of the document in corpus order
    doc_slot: int  # index into the tokenised document list
    start: int  # position of the window's first token in the document
    tokens: list[int]  # the document's tokens in this window (no BOS)
    counted_from: int = -1  # first position the window counts (> start when it overlaps the one before)

    @property
    def context(self) -> int:
        """Leading tokens read as context only (counted by the window before)."""
        return max(self.counted_from - self.start, 0)


@dataclass
class TokenisedCorpus:
    documents: list[int]  # corpus index of each kept document
    tokens: list[list[int]]  # its tokens, BOS not included
    windows: list[Window]
    first_window: list[int]  # index into windows of each document's first window
    chunk: int  # document tokens per window
    bos: int | None
    truncated_documents: int = 0
    # slot -> the first token that the --max-tokens cut dropped: the kept prefix's true next token
    cut_next: dict[int, int] = field(default_factory=dict)
    # False for an encoder's corpus (catalog/extract/encoder.py): ``bos`` holds its CLS and ``sep``
    # its SEP, read after each window's tokens and never counted
    causal: bool = True
    sep: int | None = None
    overlap: int = 0  # context tokens a window after the first reads before the ones it counts

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def stride(self) -> int:
        return self.chunk - self.overlap

    def window_of(self, doc_slot: int, position: int) -> int:
        """The window that counts ``position`` of the document."""
        if position < self.chunk:
            return self.first_window[doc_slot]
        return self.first_window[doc_slot] + 1 + (position - self.chunk) // self.stride

    def n_windows(self, doc_slot: int) -> int:
        n = len(self.tokens[doc_slot])
        return 1 if n <= self.chunk else 1 + math.ceil((n - self.chunk) / self.stride)

    def prefix_lengths(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Document tokens the model read up to and including each (slot, position), BOS not counted."""
        out = [pos - self.windows[self.window_of(s, pos)].start + 1 for s, pos in zip(slots.tolist(), positions.tolist(), strict=True)]
        return torch.tensor(out, dtype=torch.long)


class BosError(ValueError):
    """A --bos token the tokenizer does not have."""


DOCUMENT_SEPARATOR = "<|endoftext|>"


def choose_bos(tokenizer: Any, spec: str | int | None = "auto") -> tuple[int | None, str]:
    """The token read before every window, and why: ``spec`` is "auto", "none", a token's text, an id or None.

    "auto": the tokenizer's BOS when it adds one itself (``add_bos_token`` true, as LLaMA's do) or
    does not say; when it says it adds none but the vocabulary has ``<|endoftext|>`` (GPT-2-style
    BPE, SmolLM2), that document separator, which is what the model saw between pretraining
    documents: SmolLM2-Instruct's GGUF names ``<|im_start|>`` as BOS, a chat-role header that would
    put every document after "<|im_start|>". Otherwise the tokenizer's BOS, or none.
    """
    if spec is None or spec == "none":
        return None, "none"
    if isinstance(spec, int):
        return spec, "given id"
    if spec != "auto":
        tid = tokenizer.convert_tokens_to_ids(spec)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is None or (isinstance(tid, int) and tid == unk and spec != getattr(tokenizer, "unk_token", None)):
            raise BosError(f"--bos {spec!r}: the tokenizer has no such token (give a token's exact text, or none)")
        return int(tid), "given"
    bos = getattr(tokenizer, "bos_token_id", None)
    adds = getattr(tokenizer, "add_bos_token", None)
    if adds is False:
        sep = tokenizer.get_vocab().get(DOCUMENT_SEPARATOR)
        if sep is not None:
            return int(sep), f"the tokenizer adds no BOS; {DOCUMENT_SEPARATOR} separates pretraining documents"
    if bos is not None:
        return int(bos), "the tokenizer's BOS"
    return None, "the tokenizer has no BOS"


def tokenise(
    documents: Sequence[Document],
    tokenizer: object,
    *,
    window: int,
    max_tokens: int | None = None,
    causal: bool = True,
    bos: str | int | None = "auto",
    overlap: int | None = None,
) -> TokenisedCorpus:
    """Tokenise documents in corpus order, cap at ``max_tokens`` and split them into windows.

    ``bos``: see :func:`choose_bos`. ``causal=False`` (an encoder): each window is read as
    [CLS] + its tokens + [SEP]. ``overlap``: context tokens of each window after a document's first
    (default: half a window).
    """
    sep = None
    if causal:
        bos, _ = choose_bos(tokenizer, bos)
    else:
        bos, sep = frame_tokens(tokenizer)
    chunk = window - (bos is not None) - (sep is not None)
    if chunk < 1:
        raise ValueError("window must hold at least one document token")
    if overlap is None:  # an encoder reads both sides: left context alone would not help it
        overlap = chunk // 2 if causal else 0
    if not 0 <= overlap < chunk:
        raise ValueError(f"overlap must be 0-{chunk - 1} tokens (the window holds {chunk} document tokens)")
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    corpus = TokenisedCorpus([], [], [], [], chunk, bos, causal=causal, sep=sep, overlap=overlap)
    budget = max_tokens if max_tokens is not None else math.inf
    for doc, ids in zip(documents, encoded, strict=True):
        if budget <= 0:
            break
        if not ids:
            continue
        slot = len(corpus.tokens)
        if len(ids) > budget:
            corpus.cut_next[slot] = int(ids[int(budget)])  # the document goes on: not an end
            ids = ids[: int(budget)]
            corpus.truncated_documents += 1
        budget -= len(ids)
        corpus.documents.append(doc.index)
        corpus.tokens.append(list(ids))
        corpus.first_window.append(len(corpus.windows))
        corpus.windows.append(Window(doc.index, slot, 0, list(ids[:chunk]), 0))
        for counted in range(chunk, len(ids), corpus.stride):
            start = counted - overlap
            corpus.windows.append(Window(doc.index, slot, start, list(ids[start : counted + corpus.stride]), counted))
    return corpus


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


def _pad_rows(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


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
        ids, mask = _pad_rows(rows, pad, device)
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
        if pending and (rows_pending + n_win) * new_width > batch_tokens:
            yield make(pending)
            pending, rows_pending, new_width = [], 0, w
        pending.append(slot)
        rows_pending += n_win
        width = new_width
    if pending:
        yield make(pending)


@contextmanager
def capture_coefficients(
    value_projs: Sequence[nn.Module], on_layer: Callable[[int, torch.Tensor], None], shape: list[int]
) -> Iterator[None]:
    """Call ``on_layer(layer, coefficients [batch, pos, d_mlp])`` during each forward pass.

    ``shape`` holds the current [batch, pos]; OPT flattens the MLP input to [batch*pos, d_mlp].
    """

    def hook_for(layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            on_layer(layer, args[0].detach().reshape(shape[0], shape[1], -1))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(value_projs)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(
    modules: Sequence[nn.Module], on_layer: Callable[[int, torch.Tensor], None], shape: list[int]
) -> Iterator[None]:
    """Call ``on_layer(layer, output [batch, pos, d_mlp])`` with each module's forward output
    (the key projections: their output is the pre-activation, bias included)."""

    def hook_for(layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            on_layer(layer, out.detach().reshape(shape[0], shape[1], -1))

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class TopState:
    """Running top-N of one layer and sign: [d_mlp, N] tensors, strongest first, distinct documents.

    Merging two states (``merge``) is associative and commutative, so shards can be combined in any
    order. Ties are broken by lower document index (and lower position within a document).
    """

    values: torch.Tensor  # coefficient (sign-adjusted: larger is stronger); -inf = empty slot
    documents: torch.Tensor  # corpus document index; -1 = empty
    positions: torch.Tensor  # position in the document
    previous: torch.Tensor  # coefficient one position earlier in the window (the prefix without its last token)

    @classmethod
    def empty(cls, d_mlp: int, n: int, device: torch.device) -> TopState:
        return cls(
            torch.full((d_mlp, n), -math.inf, device=device),
            torch.full((d_mlp, n), -1, dtype=torch.long, device=device),
            torch.zeros((d_mlp, n), dtype=torch.long, device=device),
            torch.full((d_mlp, n), math.nan, device=device),
        )

    def merge(self, other: TopState) -> TopState:
        """One ``topk`` over the union of both states' candidates (a document is never in both)."""
        n = self.values.shape[1]
        values = torch.cat([self.values, other.values], dim=1)
        docs = torch.cat([self.documents, other.documents], dim=1)
        order = sort_key(values, docs).topk(n, dim=1, sorted=True).indices
        cat = torch.cat
        return TopState(
            values.gather(1, order),
            docs.gather(1, order),
            cat([self.positions, other.positions], dim=1).gather(1, order),
            cat([self.previous, other.previous], dim=1).gather(1, order),
        )


def sort_key(values: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """An int64 whose order is (value descending, document ascending): a total order, so topk is exact.

    The float32 bits are mapped to an int32 of the same order (negative floats get their magnitude
    bits flipped) and placed above 32 bits that decrease with the document index.
    """
    # + 0.0 turns -0.0 into +0.0: the two are equal coefficients and must tie (then lower document wins).
    bits = (values.float() + 0.0).contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (ordered << 32) | (0x7FFFFFFF - documents)


@dataclass
class RunningStats:
    """Per neuron over every counted position, in float64: count, mean, sum of squared deviations
    (Chan et al.'s pairwise merge, so shards and batches combine without E[x^2] - E[x]^2
    cancellation), positive count, max."""

    mean: torch.Tensor
    m2: torch.Tensor
    positive: torch.Tensor
    maximum: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, d_mlp: int, device: torch.device) -> RunningStats:
        z = torch.zeros(d_mlp, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone(), torch.full((d_mlp,), -math.inf, dtype=torch.float64, device=device))

    def update(self, coeffs: torch.Tensor, counted: torch.Tensor, best: torch.Tensor) -> None:
        """coeffs [batch, pos, d_mlp]; counted [batch, pos] bool; best [rows, d_mlp] per-row maxima.

        The batch's sums are float32 matrix-vector products (a batch holds a few thousand positions),
        its squares taken about the batch's own mean; the merge into the totals is float64.
        """
        n = int(counted.sum())
        if n == 0:
            return
        flat = coeffs.reshape(-1, coeffs.shape[-1])  # [rows*pos, d_mlp]
        m = counted.reshape(1, -1).to(flat.dtype)
        rough = (m @ flat).squeeze(0) / n  # [d_mlp] float32: off by its rounding for a large mean
        centred = flat - rough
        residual = (m @ centred).squeeze(0).double() / n  # the rounding, from small numbers
        m2 = (m @ centred.mul_(centred)).squeeze(0).double() - n * residual * residual  # squared in place
        batch = RunningStats(rough.double() + residual, m2.clamp(min=0),
                             (m @ positive(flat)).squeeze(0).double(), best.max(0).values.double(), n)
        merged = self.merge(batch)
        self.mean, self.m2, self.positive, self.maximum, self.count = (
            merged.mean, merged.m2, merged.positive, merged.maximum, merged.count)

    def merge(self, other: RunningStats) -> RunningStats:
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return RunningStats(mean, m2, self.positive + other.positive, torch.maximum(self.maximum, other.maximum), n)

    def summary(self) -> dict[str, torch.Tensor]:
        n = max(self.count, 1)
        return {"mean": self.mean, "std": (self.m2 / n).clamp(min=0).sqrt(), "positive_fraction": self.positive / n,
                "max": self.maximum}


# |coefficient| histogram, binned straight from the float32 bits (no logarithm): the exponent and the
# top ABS_MANTISSA_BITS bits of the mantissa, i.e. 16 linear bins per octave from 2^ABS_LO_EXP to
# 2^ABS_HI_EXP (bin 0 holds smaller |c|, the last bin larger). A bin's upper edge is at most 17/16 of
# its lower one, so a quantile read off it (linear inside its bin) is within 6.25% of the exact one.
ABS_MANTISSA_BITS = 4
ABS_LO_EXP, ABS_HI_EXP = -20, 14  # 2^-20 ~ 1e-6 .. 2^14 ~ 1.6e4
ABS_BINS = (ABS_HI_EXP - ABS_LO_EXP) << ABS_MANTISSA_BITS
_ABS_SHIFT = 23 - ABS_MANTISSA_BITS
_ABS_FIRST = (ABS_LO_EXP + 127) << ABS_MANTISSA_BITS  # the bit pattern >> _ABS_SHIFT of 2^ABS_LO_EXP


@dataclass
class FiringStats:
    """Per neuron over every counted position: how often the key's pre-activation is positive (the
    gate is open: gate.x > 0 for gated MLPs, x.k + b > 0 otherwise) and a histogram of |coefficient|.
    Both are plain counts, so shards merge by addition."""

    gate_open: torch.Tensor  # [d_mlp] float64
    abs_hist: torch.Tensor  # [d_mlp, ABS_BINS + 2] int64
    count: int = 0

    @classmethod
    def empty(cls, d_mlp: int, device: torch.device) -> FiringStats:
        return cls(torch.zeros(d_mlp, dtype=torch.float64, device=device),
                   torch.zeros((d_mlp, ABS_BINS + 2), dtype=torch.long, device=device))

    def add_preactivation(self, pre: torch.Tensor, counted: torch.Tensor) -> None:
        """pre [batch, pos, d_mlp] key pre-activations."""
        m = counted.reshape(1, -1).to(pre.dtype)
        self.gate_open += (m @ positive(pre.reshape(-1, pre.shape[-1]))).squeeze(0).double()

    def add_masked(self, masked: torch.Tensor, counted: torch.Tensor) -> None:
        """Histogram the counted coefficients from a copy whose uncounted positions hold -inf: those all
        land in the overflow bin and are taken out of it again (no gather of the counted rows)."""
        n = int(counted.sum())
        self.count += n
        hist = abs_histogram(masked.reshape(-1, masked.shape[-1]))
        hist[:, -1] -= counted.numel() - n
        self.abs_hist += hist

    def merge(self, other: FiringStats) -> FiringStats:
        return FiringStats(self.gate_open + other.gate_open, self.abs_hist + other.abs_hist, self.count + other.count)

    def summary(self) -> dict[str, torch.Tensor]:
        n = max(self.count, 1)
        out = {"gate_open_fraction": self.gate_open / n}
        for q in (50, 90, 99):
            out[f"abs_p{q}"] = histogram_quantile(self.abs_hist, q / 100)
        return out


def abs_bin(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |x| (int32), from its float32 bits; NaN lands in the overflow bin."""
    bits = (x.float().contiguous().view(torch.int32) & 0x7FFFFFFF) >> _ABS_SHIFT
    return (bits - (_ABS_FIRST - 1)).clamp_(0, ABS_BINS + 1)


def positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0 (same dtype): the sign of relu(x). About 3x faster on CPU than
    (x > 0).to(dtype), whose bool tensor costs a pass of its own."""
    return torch.relu(x).sign_()


def abs_histogram(flat: torch.Tensor) -> torch.Tensor:
    """[n, d_mlp] coefficients -> [d_mlp, ABS_BINS + 2] counts.

    Binned neuron-major (one transposed copy): bincount then walks each neuron's bins in turn, about
    4x faster than scattering position by position across every neuron's bins.
    """
    width = ABS_BINS + 2
    d = flat.shape[1]
    bits = flat.float().T.contiguous().view(torch.int32)  # [d_mlp, n], a copy we may overwrite
    bits.bitwise_and_(0x7FFFFFFF).bitwise_right_shift_(_ABS_SHIFT).sub_(_ABS_FIRST - 1).clamp_(0, ABS_BINS + 1)
    bits.add_(torch.arange(0, d * width, width, dtype=torch.int32, device=flat.device).unsqueeze(1))
    return torch.bincount(bits.reshape(-1), minlength=d * width).view(d, width)


def bin_edges() -> torch.Tensor:
    """[ABS_BINS + 1] float64 edges of the inner bins (bin b, 1 <= b <= ABS_BINS, is [edge[b-1], edge[b]))."""
    k = torch.arange(ABS_BINS + 1, dtype=torch.float64)
    octave, step = torch.div(k, 1 << ABS_MANTISSA_BITS, rounding_mode="floor"), k % (1 << ABS_MANTISSA_BITS)
    return torch.pow(2.0, octave + ABS_LO_EXP) * (1 + step / (1 << ABS_MANTISSA_BITS))


def histogram_quantile(hist: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |coefficient| per neuron from its histogram, linear inside the bin (0 inside
    bin 0, the top edge for the overflow bin); NaN for an empty row."""
    h = hist.double()
    n = h.sum(dim=1, keepdim=True)
    cum = h.cumsum(dim=1)
    target = q * n
    b = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=h.shape[1] - 1)  # first cum >= target
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = h.gather(1, b)
    frac = torch.where(inside > 0, (target - before) / inside, torch.zeros_like(target)).clamp(0, 1)
    edges = bin_edges().to(h.device)
    lo = edges[(b - 1).clamp(0, ABS_BINS)]
    hi = edges[b.clamp(max=ABS_BINS)]
    value = lo + frac * (hi - lo)
    value = torch.where(b == 0, frac * edges[0], torch.where(b == h.shape[1] - 1, edges[-1], value))
    return torch.where(n > 0, value, torch.full_like(value, math.nan)).squeeze(1)


def masked_extremes(masked: torch.Tensor, *, lowest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and neuron: the extreme counted coefficient and its first position, [batch, d_mlp] each, of
    coefficients whose uncounted positions already hold -inf (max) / +inf (min)."""
    # max/min along a dim return the index of the first extreme value: ties go to the shorter prefix.
    out = masked.min(dim=1) if lowest else masked.max(dim=1)
    return out.values, out.indices


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
    extra: dict[str, float] = field(default_factory=dict)


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
) -> PassResult:
    """Run the model once over the corpus and fold every layer's coefficients into top-N and stats."""
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
        coeffs = coeffs.float()
        batch = current[0]
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
        fire[layer].add_preactivation(pre.float(), current[0].counted)

    t0 = time.perf_counter()
    tokens = 0
    body = backbone(model)
    with torch.inference_mode(), capture_coefficients(value_projs, on_layer, shape), \
            capture_outputs(key_projs or [], on_preactivation, shape):
        for batch in batches(corpus, batch_tokens=batch_tokens, pad=pad, device=device):
            shape[:] = list(batch.input_ids.shape)
            current[:] = [batch]
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += batch.n_tokens
            if progress is not None:
                progress(batch.n_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return PassResult(stats, fire, top, bottom, tokens, time.perf_counter() - t0)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: coefficients need no logits, which cost ~a fifth of a
    small model's forward pass (SmolLM2: 576 x 49152 per token)."""
    return getattr(model, "base_model", model)


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
