"""The analysis stages as they were before part 10's speed-ups: the references that the faster
implementations are checked against (tests/test_stages.py) and timed against (bench/part10_stages.py)."""

from __future__ import annotations

import math

import torch

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
