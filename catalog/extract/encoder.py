"""Encoders (the BERT family) in the catalog: what differs from a causal LM, in one place.

An encoder's attention sees its whole window, both sides of every token. So:

- each window is read as [CLS] + the window's document tokens + [SEP], with the tokenizer's own
  ids; CLS takes the place a decoder's BOS has, and only the document tokens are counted;
- a trigger is a token position *in context*: its coefficient depends on the tokens after it too.
  The stored text is the window up to and including the trigger, and ``text_after`` the rest of the
  window, so that the two read as the window the model saw;
- removing a token changes the context of every position, and a neighbour's coefficient is not the
  prefix without the trigger (``TopState.previous`` is NaN), so the prefix ablations and the
  suggested labels built on them do not apply: they are stored null;
- a masked LM reads its output at a position as that position's token, so agreement compares the
  value's top token with the trigger token itself, not with the next one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from catalog.extract.ablation import PrefixTable
    from catalog.extract.windows import TokenisedCorpus


def agreement_targets(prefix_token: torch.Tensor, prefix_next: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Per prefix, the token its neurons' values should promote: the next token for a causal LM, the
    trigger token itself for an encoder (-1 where there is none)."""
    return prefix_next if causal else prefix_token


def texts_after(corpus: TokenisedCorpus, table: PrefixTable, tokenizer: object) -> list[str]:
    """Per prefix, the text of its window after the trigger token.

    Taken from the decoded whole window where the decoded prefix starts it, so that text + text_after
    is the window's text (a word piece after the trigger continues its word with no space);
    otherwise the tokens after the trigger decoded on their own.
    """
    decode = tokenizer.batch_decode  # type: ignore[attr-defined]
    windows, cuts = [], []
    for slot, pos in zip(table.slots.tolist(), table.positions.tolist(), strict=True):
        w = corpus.windows[corpus.window_of(slot, pos)]
        windows.append(w.tokens)
        cuts.append(pos - w.start + 1)
    heads: list[str] = decode([t[:c] for t, c in zip(windows, cuts, strict=True)], skip_special_tokens=False)
    wholes: list[str] = decode(windows, skip_special_tokens=False)
    tails: list[str] = decode([t[c:] for t, c in zip(windows, cuts, strict=True)], skip_special_tokens=False)
    out = []
    for head, whole, tail in zip(heads, wholes, tails, strict=True):
        if whole.startswith(head):
            out.append(whole[len(head):])
        else:
            out.append(f" {tail}" if tail else "")
    return out
