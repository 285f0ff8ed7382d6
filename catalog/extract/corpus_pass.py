"""One forward pass over a corpus serving every layer at once: trigger prefixes and activation statistics.

The memory coefficient of neuron i at a position is the MLP's hidden activation there, read as
the input of the value projection (c_proj / dense_4h_to_h / fc2 / down_proj) by a forward
pre-hook; for gated models that input is silu(x.g_i) * (x.u_i). Per layer the hook folds the
batch into a running top-N per neuron that lives on the model's device (Neuroscope's MaxStore):
per-document maxima first, then one sort over the union of kept and new candidates. Nothing per
token is kept for the whole corpus.

Terms: a *document* is one corpus unit; documents longer than the window are split into
*windows*, each starting with BOS when the tokenizer has one (BOS is never counted or a trigger).
A trigger's *prefix* is its window's tokens up to and including the trigger position. Positions are
0-based among the document's own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from catalog.corpus import Document


@dataclass(frozen=True)
class Window:
    document: int  # index of the document in corpus order
    doc_slot: int  # index into the tokenised document list
    start: int  # position of the window's first token in the document
    tokens: list[int]  # the document's tokens in this window (no BOS)


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

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def window_of(self, doc_slot: int, position: int) -> int:
        return self.first_window[doc_slot] + position // self.chunk


def tokenise(
    documents: Sequence[Document],
    tokenizer: object,
    *,
    window: int,
    max_tokens: int | None = None,
) -> TokenisedCorpus:
    """Tokenise documents in corpus order, cap at ``max_tokens`` and split them into windows."""
    bos = getattr(tokenizer, "bos_token_id", None)
    chunk = window - 1 if bos is not None else window
    if chunk < 1:
        raise ValueError("window must hold at least one document token")
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    corpus = TokenisedCorpus([], [], [], [], chunk, bos)
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
        for start in range(0, len(ids), chunk):
            corpus.windows.append(Window(doc.index, slot, start, list(ids[start : start + chunk])))
    return corpus


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    counted: torch.Tensor  # [batch, pos] bool: a document token (not BOS, not padding)
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

    Right padding keeps every real position exact in a causal model. Keeping a document's windows
    in one batch lets per-document maxima be taken before the top-N merge.
    """
    lead = [corpus.bos] if corpus.bos is not None else []
    order = sorted(range(len(corpus.tokens)), key=lambda s: (-min(len(corpus.tokens[s]), corpus.chunk), s))
    pending: list[int] = []
    width = 0

    def make(slots: list[int]) -> Batch:
        rows: list[list[int]] = []
        win_ids: list[int] = []
        doc_of_row: list[int] = []
        for j, slot in enumerate(slots):
            n_win = math.ceil(len(corpus.tokens[slot]) / corpus.chunk)
            for w in range(corpus.first_window[slot], corpus.first_window[slot] + n_win):
                rows.append(lead + corpus.windows[w].tokens)
                win_ids.append(w)
                doc_of_row.append(j)
        ids, mask = _pad_rows(rows, pad, device)
        counted = mask.bool().clone()
        if lead:
            counted[:, 0] = False
        return Batch(ids, mask, counted, win_ids, torch.tensor(doc_of_row, device=device), len(slots), slots)

    rows_pending = 0
    for slot in order:
        n_win = math.ceil(len(corpus.tokens[slot]) / corpus.chunk)
        w = min(len(corpus.tokens[slot]), corpus.chunk) + len(lead)
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
        m2 = (m @ (centred * centred)).squeeze(0).double() - n * residual * residual
        batch = RunningStats(rough.double() + residual, m2.clamp(min=0),
                             (m @ (flat > 0).to(flat.dtype)).squeeze(0).double(), best.max(0).values.double(), n)
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


def row_extremes(coeffs: torch.Tensor, counted: torch.Tensor, *, lowest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and neuron: the extreme counted coefficient and its first position, [batch, d_mlp] each."""
    fill = math.inf if lowest else -math.inf
    masked = coeffs.masked_fill(~counted.unsqueeze(-1), fill)
    # max/min along a dim return the index of the first extreme value: ties go to the shorter prefix.
    out = masked.min(dim=1) if lowest else masked.max(dim=1)
    return out.values, out.indices


def batch_candidates(
    coeffs: torch.Tensor, best: torch.Tensor, at: torch.Tensor, batch: Batch, corpus: TokenisedCorpus, lead: int,
    *, sign: int = 1,
) -> TopState:
    """Per-document extremes of one batch as a TopState of [d_mlp, n_docs] candidates.

    best/at: each row's extreme coefficient and its index (from ``row_extremes``); values are stored
    multiplied by ``sign`` so that larger is always stronger.
    """
    prev_idx = at - 1  # BOS (index 0) when the trigger is the window's first token
    prev = coeffs.gather(1, prev_idx.clamp(min=0).unsqueeze(1)).squeeze(1)
    prev = torch.where(prev_idx >= 0, prev, torch.full_like(prev, math.nan))
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
    progress: Callable[[int], None] | None = None,
) -> PassResult:
    """Run the model once over the corpus and fold every layer's coefficients into top-N and stats."""
    import time

    device = next(model.parameters()).device
    d_mlp = _d_mlp(value_projs[0])
    n_layers = len(value_projs)
    lead = 1 if corpus.bos is not None else 0
    stats = [RunningStats.empty(d_mlp, device) for _ in range(n_layers)]
    top = [TopState.empty(d_mlp, top_n, device) for _ in range(n_layers)]
    bottom = [TopState.empty(d_mlp, top_n, device) for _ in range(n_layers)] if gated else None
    shape = [0, 0]
    current: list[Batch] = []

    def on_layer(layer: int, coeffs: torch.Tensor) -> None:
        coeffs = coeffs.float()
        batch = current[0]
        best, at = row_extremes(coeffs, batch.counted)
        stats[layer].update(coeffs, batch.counted, best)
        top[layer] = top[layer].merge(batch_candidates(coeffs, best, at, batch, corpus, lead))
        if bottom is not None:
            low, low_at = row_extremes(coeffs, batch.counted, lowest=True)
            bottom[layer] = bottom[layer].merge(batch_candidates(coeffs, low, low_at, batch, corpus, lead, sign=-1))

    t0 = time.perf_counter()
    tokens = 0
    body = backbone(model)
    with torch.inference_mode(), capture_coefficients(value_projs, on_layer, shape):
        for batch in batches(corpus, batch_tokens=batch_tokens, pad=pad, device=device):
            shape[:] = list(batch.input_ids.shape)
            current[:] = [batch]
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += batch.n_tokens
            if progress is not None:
                progress(batch.n_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return PassResult(stats, top, bottom, tokens, time.perf_counter() - t0)


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
