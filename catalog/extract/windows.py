"""Documents -> windows: BOS choice, tokenisation, the --max-tokens cut and overlapping windows.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from catalog.corpus import Document
from catalog.extract.architectures import UnsupportedArchitecture


class EncoderTokenizerError(UnsupportedArchitecture):
    """An encoder whose tokenizer lacks the [CLS] / [SEP] tokens its windows are framed with."""


def frame_tokens(tokenizer: object) -> tuple[int, int]:
    """The (CLS, SEP) ids an encoder's windows are framed with."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        raise EncoderTokenizerError("an encoder's tokenizer needs a CLS and a SEP token (BERT's [CLS], [SEP])")
    return int(cls), int(sep)


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
    cut_at: Mapping[int, int] | None = None,
) -> TokenisedCorpus:
    """Tokenise documents in corpus order, cap at ``max_tokens`` and split them into windows.

    ``cut_at``: corpus document index -> tokens kept of it; how a shard (or the trigger documents)
    re-reads the one document that a run's --max-tokens cut, wherever the budget was counted.

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
        if cut_at is not None and doc.index in cut_at and len(ids) > cut_at[doc.index]:
            corpus.cut_next[slot] = int(ids[cut_at[doc.index]])
            ids = ids[: cut_at[doc.index]]
            corpus.truncated_documents += 1
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
