"""The suggested label: a paired ablation contrast per trigger, pooled thresholds, bootstrap confidence.

Removing any token from a trigger prefix lowers its coefficient, because the trigger is the
document's maximum: a raw "drop without the last token" is mostly selection. Removing one random
*other* token is the control for that. Per trigger of a neuron (coefficient a, with the last token
removed a_last, with one random other token removed a_rand), in units of the neuron's typical
trigger coefficient s (the median a over its triggers, so a tiny |a| cannot blow a ratio up):

- contrast = (a_rand - a_last) / s: how much more the last token matters than a random other one;
- context = (a - a_rand) / s: how much one random earlier token matters.

A neuron's inputs are the medians of both over its triggers whose prefix holds at least
``min_prefix`` tokens (short prefixes make every removal large). The thresholds are quantiles
(``quantile``, the median by default) of those medians pooled over every neuron of every layer,
so that depth trends survive (per-layer thresholds would give every layer the same shares):

- ``shallow``: contrast >= t_contrast and context < t_context (the last token decides);
- ``shallow+semantic``: contrast >= t_contrast and context >= t_context;
- ``semantic``: contrast < t_contrast (the last token matters no more than the model's typical
  neuron's does: the pattern lies in the context);
- null: fewer than ``min_triggers`` such triggers.

The confidence is the share of ``bootstrap`` resamples of the neuron's eligible triggers (with
replacement, fixed seed) whose medians give the same label under the same thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from catalog.extract.blocks import run_blocks
from catalog.vocab import SuggestedLabel


@dataclass(frozen=True)
class LabelRule:
    min_prefix: int = 4
    min_triggers: int = 5
    quantile: float = 0.5
    bootstrap: int = 200
    seed: int = 0


@dataclass
class LabelInputs:
    """One layer's per-neuron label inputs, [d_mlp] each (NaN where undefined)."""

    contrast: torch.Tensor
    context: torch.Tensor
    triggers: torch.Tensor  # int64: eligible triggers
    scale: torch.Tensor  # the typical trigger coefficient s


@dataclass
class LayerLabels:
    inputs: LabelInputs
    labels: list[str | None]
    confidence: torch.Tensor  # [d_mlp] float64, NaN where the label is null


def _median(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """numpy's median (mean of the two middle values) over non-NaN entries; NaN where there are none."""
    return torch.nanquantile(x.double(), 0.5, dim=dim)


def typical_coefficient(a: torch.Tensor) -> torch.Tensor:
    """The neuron's typical trigger coefficient s [d_mlp] float64: the median of its (top) trigger
    coefficients a [d_mlp, N] (NaN where no trigger), NaN where that median is not positive (a neuron
    that does not fire on the corpus has no scale). The unit of the label's contrast and context, and
    the floor of the prefix ablations' relative change (``catalog.extract.ablation.relative_change``),
    so that a tiny |a| cannot blow a ratio up."""
    scale = _median(a.double())
    return torch.where(scale > 0, scale, torch.full_like(scale, math.nan))


def per_trigger(a: torch.Tensor, a_last: torch.Tensor, a_rand: torch.Tensor, lengths: torch.Tensor,
                rule: LabelRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[d_mlp, N] contrast and context per trigger (NaN where not eligible), and the scale [d_mlp]."""
    a, a_last, a_rand = a.double(), a_last.double(), a_rand.double()
    scale = typical_coefficient(a).unsqueeze(1)
    ok = (lengths >= rule.min_prefix) & a.isfinite() & a_last.isfinite() & a_rand.isfinite()
    nan = torch.full_like(a, math.nan)
    contrast = torch.where(ok, (a_rand - a_last) / scale, nan)
    context = torch.where(ok, (a - a_rand) / scale, nan)
    return contrast, context, scale.squeeze(1)


def inputs(a: torch.Tensor, a_last: torch.Tensor, a_rand: torch.Tensor, lengths: torch.Tensor,
           rule: LabelRule) -> tuple[LabelInputs, torch.Tensor, torch.Tensor]:
    """The neuron medians, plus the per-trigger contrast and context the bootstrap resamples."""
    contrast, context, scale = per_trigger(a, a_last, a_rand, lengths, rule)
    n = (~contrast.isnan()).sum(dim=1)
    few = n < rule.min_triggers
    nan = torch.full((a.shape[0],), math.nan, dtype=torch.float64)
    return (
        LabelInputs(torch.where(few, nan, _median(contrast)), torch.where(few, nan, _median(context)), n, scale),
        contrast, context,
    )


def thresholds(layers: Sequence[LabelInputs], rule: LabelRule) -> tuple[float | None, float | None]:
    """The pooled quantiles of the neuron medians over every layer."""
    c = torch.cat([x.contrast for x in layers])
    x = torch.cat([x.context for x in layers])
    c, x = c[~c.isnan()], x[~x.isnan()]
    if c.numel() == 0:
        return None, None
    return float(torch.quantile(c, rule.quantile)), float(torch.quantile(x, rule.quantile))


def classify(contrast: torch.Tensor, context: torch.Tensor, t_contrast: float, t_context: float) -> torch.Tensor:
    """Label codes: 0 shallow, 1 semantic, 2 shallow+semantic, -1 null (any shape)."""
    code = torch.where(contrast >= t_contrast, torch.where(context >= t_context, 2, 0), 1)
    return torch.where(contrast.isnan() | context.isnan(), -1, code)


# classify's codes 0, 1, 2, in this order
CODES = (SuggestedLabel.shallow.value, SuggestedLabel.semantic.value, SuggestedLabel.shallow_semantic.value)


def bootstrap_confidence(contrast: torch.Tensor, context: torch.Tensor, labels: torch.Tensor,
                         t_contrast: float, t_context: float, rule: LabelRule, layer: int,
                         *, block: int = 32) -> torch.Tensor:
    """Share of resamples (of each neuron's eligible triggers, with replacement) giving the same label.

    Resample b of neuron i draws indices floor(u * n_i) from u = the first n_i of row (i, b) of one
    [d_mlp, bootstrap, N] uniform draw (seeded by rule.seed and layer). Its medians are read off the
    draws' counts instead of sorting every resample: with the neuron's values sorted once, the k-th
    smallest drawn value is the first sorted value whose cumulative count exceeds k. Same numbers as
    ``torch.nanquantile`` over the resampled values (same middle values, same interpolation), at a
    fraction of the cost; blocks of ``block`` neurons keep the work in cache.
    """
    d, n_max = contrast.shape
    ok = ~contrast.isnan()
    n = ok.sum(dim=1)
    # eligible triggers first in each row, so a resample draws indices below n_i
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)
    c, x = contrast.gather(1, order), context.gather(1, order)
    gen = torch.Generator().manual_seed(rule.seed * 1_000_003 + layer)
    # NaN for a null label; 0 for a label with no eligible trigger (its resamples have no median)
    conf = torch.where(labels >= 0, 0.0, math.nan).double()
    count_dtype = torch.int16 if n_max < 2**15 else torch.int32
    slot = torch.arange(n_max)

    def draw(a: int, b: int) -> torch.Tensor:  # in block order: the same stream as one [d, bootstrap, n_max] draw
        return torch.rand((b - a, rule.bootstrap, n_max), generator=gen, dtype=torch.float64)

    def resample(a: int, b: int, u: torch.Tensor) -> None:
        rows = ((labels[a:b] >= 0) & (n[a:b] > 0)).nonzero().squeeze(1)  # a null label has no confidence
        if rows.numel() == 0:
            return
        nb = n[a:b][rows]
        if rows.numel() < b - a:
            u = u[rows]
        idx = u.mul_(nb.view(-1, 1, 1)).long().clamp_(max=n_max - 1)
        # draws past n_i are not part of the resample: counted in a spare last slot
        idx.masked_fill_(slot.view(1, 1, n_max) >= nb.view(-1, 1, 1), n_max)
        counts = torch.zeros((rows.numel(), rule.bootstrap, n_max + 1), dtype=count_dtype)
        counts.scatter_add_(2, idx, torch.ones(1, 1, 1, dtype=count_dtype).expand_as(idx))
        counts = counts[:, :, :n_max]
        medians = [_resample_median(v[a:b][rows], nb, counts) for v in (c, x)]
        same = classify(medians[0], medians[1], t_contrast, t_context) == labels[a:b][rows].unsqueeze(1)
        conf[a + rows] = same.double().mean(dim=1)

    run_blocks(d, block, resample, draw)
    return conf


def _resample_median(values: torch.Tensor, n: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[k, bootstrap] medians of resamples given by their draw counts [k, bootstrap, N] over the
    eligible values [k, N] (the first n_i of row i; the rest NaN), as ``torch.nanquantile(.., 0.5)``."""
    # NaN sorts as +inf; a stable sort keeps the eligible +inf (if any) before them
    ranked, perm = torch.sort(torch.nan_to_num(values, nan=math.inf), dim=1, stable=True)
    cum = counts.gather(2, perm.unsqueeze(1).expand_as(counts)).cumsum(2, dtype=counts.dtype)
    # the k-th smallest drawn value (0-based) is the first whose cumulative count exceeds k
    middle = torch.stack([(n - 1) // 2, n // 2], dim=1).to(counts.dtype).unsqueeze(1).expand(-1, counts.shape[1], -1)
    lo, hi = torch.searchsorted(cum, middle.contiguous(), right=True).unbind(2)
    weight = ((n - 1) * 0.5 - (n - 1) // 2).double().view(-1, 1)  # 0.5 for an even count, else 0
    return torch.lerp(ranked.gather(1, lo), ranked.gather(1, hi), weight.expand_as(lo))


def label_layers(per_layer: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                 rule: LabelRule, on_layer: Callable[[], None] | None = None) -> tuple[list[LayerLabels], dict[str, object]]:
    """Labels of every layer from (a, a_last, a_rand, prefix lengths) [d_mlp, N] per layer.

    Returns the layers' labels and the rule as applied (stored on the run). ``on_layer`` is called
    as each layer's labels are done (a progress bar's tick: the bootstrap takes a while).
    """
    parts = [inputs(*p, rule) for p in per_layer]
    t_c, t_x = thresholds([p[0] for p in parts], rule)
    applied: dict[str, object] = {**asdict(rule), "contrast_threshold": t_c, "context_threshold": t_x}
    out = []
    for layer, (inp, contrast, context) in enumerate(parts):
        if t_c is None or t_x is None:
            d = inp.contrast.shape[0]
            out.append(LayerLabels(inp, [None] * d, torch.full((d,), math.nan, dtype=torch.float64)))
            continue
        codes = classify(inp.contrast, inp.context, t_c, t_x)
        conf = bootstrap_confidence(contrast, context, codes, t_c, t_x, rule, layer)
        out.append(LayerLabels(inp, [CODES[c] if c >= 0 else None for c in codes.tolist()], conf))
        if on_layer is not None:
            on_layer()
    return out, applied
