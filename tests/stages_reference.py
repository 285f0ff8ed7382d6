"""The analysis stages as they were before part 10's speed-ups: the references that the faster
implementations are checked against (tests/test_stages.py) and timed against (bench/part10_stages.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from catalog.extract.baselines import Baselines, derangement
from catalog.extract.labels import LabelRule, classify


def _median(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.nanquantile(x.double(), 0.5, dim=dim)


def bootstrap_confidence(contrast: torch.Tensor, context: torch.Tensor, labels: torch.Tensor,
                         t_contrast: float, t_context: float, rule: LabelRule, layer: int) -> torch.Tensor:
    """labels.bootstrap_confidence before part 10: every resample materialised and its median sorted."""
    d, n_max = contrast.shape
    ok = ~contrast.isnan()
    n = ok.sum(dim=1)
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)
    c, x = contrast.gather(1, order), context.gather(1, order)
    gen = torch.Generator().manual_seed(rule.seed * 1_000_003 + layer)
    u = torch.rand((d, rule.bootstrap, n_max), generator=gen, dtype=torch.float64)
    idx = (u * n.clamp(min=1).view(d, 1, 1)).long().clamp(max=n_max - 1)
    valid = torch.arange(n_max).view(1, 1, n_max) < n.view(d, 1, 1)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    rc = torch.where(valid, c.unsqueeze(1).expand(-1, rule.bootstrap, -1).gather(2, idx), nan)
    rx = torch.where(valid, x.unsqueeze(1).expand(-1, rule.bootstrap, -1).gather(2, idx), nan)
    same = classify(_median(rc), _median(rx), t_contrast, t_context) == labels.unsqueeze(1)
    conf = same.double().mean(dim=1)
    return torch.where(labels >= 0, conf, torch.full_like(conf, math.nan))


def token_ranks(logits: torch.Tensor, token_ids: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """weights.token_ranks before part 10: a binary search of every logit among its row's targets."""
    rows = logits.shape[0]
    valid = token_ids >= 0
    target = logits.gather(1, token_ids.clamp(min=0))
    target = torch.where(valid, target, torch.full_like(target, math.inf))
    targets, order = target.sort(dim=1)
    n = targets.shape[1]
    above = torch.empty_like(token_ids)
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        below = torch.searchsorted(targets[a:b].contiguous(), logits[a:b].contiguous(), side="left", out_int32=True)
        offsets = (torch.arange(b - a, dtype=torch.int32, device=logits.device) * (n + 1)).unsqueeze(1)
        hist = torch.bincount((below + offsets).view(-1), minlength=(b - a) * (n + 1)).view(b - a, n + 1)
        above[a:b].scatter_(1, order[a:b], hist.flip(1).cumsum(1).flip(1)[:, 1:])
    return torch.where(valid, above + 1, torch.zeros_like(above))


def _rate(hits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    n = valid.sum(dim=1).double()
    rate = (hits & valid).sum(dim=1).double() / n.clamp(min=1)
    return torch.where(n > 0, rate, torch.full_like(rate, math.nan))


def _percentiles(logits: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = token_ranks(logits, next_ids).double()
    pct = (ranks - 1) / max(logits.shape[1] - 1, 1)
    return ranks, torch.where(next_ids >= 0, pct, torch.full_like(pct, math.nan))


def agreement_figures(
    logits: torch.Tensor, next_ids: torch.Tensor, token_counts: torch.Tensor, *, seed: int, layer: int,
    folded_logits: torch.Tensor | None = None, negative_next: torch.Tensor | None = None,
) -> Baselines:
    """baselines.agreement_figures before part 10: the shuffled baseline ranked on a permuted copy of
    the logits, in a second pass."""
    valid = next_ids >= 0
    top = logits.argmax(dim=1)
    ranks, pct = _percentiles(logits, next_ids)
    n = valid.sum(dim=1).double()
    nan = torch.full_like(n, math.nan)
    pi = derangement(logits.shape[0], seed, layer)
    shuffled_logits = logits[pi]
    _, pct_shuffled = _percentiles(shuffled_logits, next_ids)
    total = float(token_counts.sum())
    first = next_ids[:, 0]
    return Baselines(
        agreement=_rate(next_ids == top.unsqueeze(1), valid),
        mean_rank=torch.where(n > 0, (ranks * valid).sum(dim=1) / n.clamp(min=1), nan),
        rank_percentile=torch.nanquantile(pct, 0.5, dim=1),
        top1=torch.where(first >= 0, (first == top).double(), torch.full_like(n, math.nan)),
        shuffled=_rate(next_ids == shuffled_logits.argmax(dim=1).unsqueeze(1), valid),
        rank_percentile_shuffled=torch.nanquantile(pct_shuffled, 0.5, dim=1),
        top_token_frequency=token_counts[top].double() / max(total, 1.0),
        folded=None if folded_logits is None else _rate(next_ids == folded_logits.argmax(dim=1).unsqueeze(1), valid),
        negative=None if negative_next is None else _rate(
            negative_next == logits.argmin(dim=1).unsqueeze(1), negative_next >= 0),
        percentiles=pct[valid],
        percentiles_shuffled=pct_shuffled[valid],
    )


def nanmedian_all(x: torch.Tensor) -> float | None:
    """ablation.nanmedian_all (and pipeline._median) before part 10: torch.quantile, a full sort."""
    v = x.double().reshape(-1)
    v = v[~v.isnan()]
    return None if v.numel() == 0 else float(torch.quantile(v, 0.5))


def histogram_quantile(hist: torch.Tensor, q: float) -> torch.Tensor:
    """states.histogram_quantile before part 10 (FiringStats.summary called it once per quantile)."""
    from catalog.extract.states import ABS_BINS, bin_edges

    h = hist.double()
    n = h.sum(dim=1, keepdim=True)
    cum = h.cumsum(dim=1)
    target = q * n
    b = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=h.shape[1] - 1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = h.gather(1, b)
    frac = torch.where(inside > 0, (target - before) / inside, torch.zeros_like(target)).clamp(0, 1)
    edges = bin_edges().to(h.device)
    lo = edges[(b - 1).clamp(0, ABS_BINS)]
    hi = edges[b.clamp(max=ABS_BINS)]
    value = lo + frac * (hi - lo)
    value = torch.where(b == 0, frac * edges[0], torch.where(b == h.shape[1] - 1, edges[-1], value))
    return torch.where(n > 0, value, torch.full_like(value, math.nan)).squeeze(1)


def histogram_quantiles(hist: torch.Tensor, qs: Any) -> list[torch.Tensor]:
    return [histogram_quantile(hist, q) for q in qs]


@contextmanager
def previous() -> Iterator[None]:
    """The previous implementations patched in where the pipeline looks them up."""
    from catalog.extract import ablation as abl
    from catalog.extract import labels as lab
    from catalog.extract import pipeline as pl
    from catalog.extract import states

    patches: list[tuple[Any, str, Any]] = [
        (lab, "bootstrap_confidence", bootstrap_confidence),
        (pl, "agreement_figures", agreement_figures),
        (abl, "nanmedian_all", nanmedian_all),
        (pl, "_median", nanmedian_all),
        (states, "histogram_quantiles", histogram_quantiles),
    ]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, f in patches:
            setattr(m, name, f)
        yield
    finally:
        for m, name, f in saved:
            setattr(m, name, f)
