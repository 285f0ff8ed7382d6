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
                         t_contrast: float, t_context: float, rule: LabelRule, layer: int) -> torch.Tensor:
    """Share of resamples (of each neuron's eligible triggers, with replacement) giving the same label."""
    d, n_max = contrast.shape
    ok = ~contrast.isnan()
    n = ok.sum(dim=1)
    # eligible triggers first in each row, so a resample draws indices below n_i
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)
    c, x = contrast.gather(1, order), context.gather(1, order)
    gen = torch.Generator().manual_seed(rule.seed * 1_000_003 + layer)
    u = torch.rand((d, rule.bootstrap, n_max), generator=gen, dtype=torch.float64)
    idx = (u * n.clamp(min=1).view(d, 1, 1)).long().clamp(max=n_max - 1)
    valid = torch.arange(n_max).view(1, 1, n_max) < n.view(d, 1, 1)  # a resample has n_i draws
    nan = torch.tensor(math.nan, dtype=torch.float64)
    rc = torch.where(valid, c.unsqueeze(1).expand(-1, rule.bootstrap, -1).gather(2, idx), nan)
    rx = torch.where(valid, x.unsqueeze(1).expand(-1, rule.bootstrap, -1).gather(2, idx), nan)
    same = classify(_median(rc), _median(rx), t_contrast, t_context) == labels.unsqueeze(1)
    conf = same.double().mean(dim=1)
    return torch.where(labels >= 0, conf, torch.full_like(conf, math.nan))


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
