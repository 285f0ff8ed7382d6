"""Key-value agreement next to what chance gives (seed 001's precision figures, with baselines).

For neuron i with value logits l_i = v_i . E^T and trigger next tokens t_i1..t_iN:

- agreement: share of t_ij equal to argmax l_i (seed 001's precision@N);
- shuffled: the same with l_pi(i), the value of another neuron of the layer (pi a fixed-seed
  single-cycle permutation, so no neuron keeps its own value): what any value vector scores;
- top-token frequency: the corpus frequency of argmax l_i, the agreement a value whose top token is
  that would get if triggers told nothing about the next token;
- top-1: whether the strongest trigger's next token is the top token (Geva et al.'s per-layer rate);
- rank percentile: (rank - 1) / (vocab - 1) of each t_ij in l_i, 0 = top, 0.5 = chance; a neuron's
  figure is the median over its triggers;
- negative (gated models): the most negative triggers' next tokens against argmin l_i, since a
  negative coefficient adds -v_i, whose top token is v_i's bottom token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from catalog.extract.weights import token_ranks


@dataclass(frozen=True)
class Baselines:
    """Per-neuron figures [d_mlp] (float64, NaN where a neuron has no trigger with a next token)."""

    agreement: torch.Tensor
    mean_rank: torch.Tensor  # 1-based
    rank_percentile: torch.Tensor | None = None  # median
    top1: torch.Tensor | None = None  # 1.0 / 0.0
    shuffled: torch.Tensor | None = None
    rank_percentile_shuffled: torch.Tensor | None = None
    top_token_frequency: torch.Tensor | None = None
    folded: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    # every valid trigger's percentile (raw, shuffled), for the layer's medians
    percentiles: torch.Tensor | None = None
    percentiles_shuffled: torch.Tensor | None = None


def derangement(n: int, seed: int, layer: int) -> torch.Tensor:
    """pi with pi[i] != i for n > 1: a random order sigma, each element mapped to its successor."""
    sigma = torch.from_numpy(np.random.default_rng([seed, layer]).permutation(n))
    pi = torch.empty(n, dtype=torch.long)
    pi[sigma] = sigma.roll(-1)
    return pi


def _rate(hits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    n = valid.sum(dim=1).double()
    rate = (hits & valid).sum(dim=1).double() / n.clamp(min=1)
    return torch.where(n > 0, rate, torch.full_like(rate, math.nan))


def _percentiles(ranks: torch.Tensor, next_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rank percentiles [d_mlp, N] of 1-based ranks (NaN where next_ids < 0)."""
    pct = (ranks.double() - 1) / max(vocab - 1, 1)
    return torch.where(next_ids >= 0, pct, torch.full_like(pct, math.nan))


def agreement_figures(
    logits: torch.Tensor, next_ids: torch.Tensor, token_counts: torch.Tensor, *, seed: int, layer: int,
    folded_logits: torch.Tensor | None = None, negative_next: torch.Tensor | None = None,
) -> Baselines:
    """logits [d_mlp, vocab]; next_ids [d_mlp, N] (-1: none), strongest trigger first, on the logits'
    device; token_counts [vocab]."""
    valid = next_ids >= 0
    d, n_next = next_ids.shape
    top = logits.argmax(dim=1)
    pi = derangement(d, seed, layer).to(logits.device)
    # The shuffled baseline ranks neuron i's next tokens in row pi[i]: row r takes those of neuron
    # pi^-1(r) besides its own, so one pass over the logits ranks both (no permuted copy of them).
    owner = torch.empty_like(pi)
    owner[pi] = torch.arange(d, device=pi.device)
    both = token_ranks(logits, torch.cat([next_ids, next_ids[owner]], dim=1))
    ranks, ranks_shuffled = both[:, :n_next], both[:, n_next:][pi]
    vocab = logits.shape[1]
    pct, pct_shuffled = _percentiles(ranks, next_ids, vocab), _percentiles(ranks_shuffled, next_ids, vocab)
    ranks = ranks.double()
    n = valid.sum(dim=1).double()
    nan = torch.full_like(n, math.nan)
    total = float(token_counts.sum())
    first = next_ids[:, 0]
    return Baselines(
        agreement=_rate(next_ids == top.unsqueeze(1), valid),
        mean_rank=torch.where(n > 0, (ranks * valid).sum(dim=1) / n.clamp(min=1), nan),
        rank_percentile=torch.nanquantile(pct, 0.5, dim=1),
        top1=torch.where(first >= 0, (first == top).double(), torch.full_like(n, math.nan)),
        shuffled=_rate(next_ids == top[pi].unsqueeze(1), valid),  # row pi[i]'s top token
        rank_percentile_shuffled=torch.nanquantile(pct_shuffled, 0.5, dim=1),
        top_token_frequency=token_counts[top].double() / max(total, 1.0),
        folded=None if folded_logits is None else _rate(next_ids == folded_logits.argmax(dim=1).unsqueeze(1), valid),
        negative=None if negative_next is None else _rate(
            negative_next == logits.argmin(dim=1).unsqueeze(1), negative_next >= 0),
        percentiles=pct[valid],
        percentiles_shuffled=pct_shuffled[valid],
    )


def negative_trigger_share(top_values: torch.Tensor, bottom_values: torch.Tensor) -> torch.Tensor:
    """Of each neuron's N strongest triggers by |coefficient| (its top-N positive and top-N negative
    candidates pooled, one per document and sign), the share that are negative.

    Both inputs are sign-adjusted TopState values [d_mlp, N] (larger = stronger, -inf = empty).
    """
    n = top_values.shape[1]
    pooled = torch.cat([top_values, bottom_values], dim=1)
    negative = torch.cat([torch.zeros_like(top_values, dtype=torch.bool),
                          torch.ones_like(bottom_values, dtype=torch.bool)], dim=1)
    # the positive candidate first on equal magnitude (stable sort over the concatenation)
    order = torch.argsort(-pooled, dim=1, stable=True)[:, :n]
    kept = pooled.gather(1, order)
    filled = kept > -math.inf
    count = filled.sum(dim=1).double()
    share = (negative.gather(1, order) & filled).sum(dim=1).double() / count.clamp(min=1)
    return torch.where(count > 0, share, torch.full_like(share, math.nan))
