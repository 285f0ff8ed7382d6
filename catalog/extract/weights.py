"""Weight-derived figures per neuron and per layer (seed 000) and value-token projections.

All functions are pure: tensors in, tensors or plain dicts out. Statistics are computed in float64
so that stored figures do not depend on the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog import histograms
from catalog.extract.architectures import LayerWeights
from catalog.extract.blocks import run_blocks

HISTOGRAM_BINS = histograms.BINS


@dataclass(frozen=True)
class NeuronWeights:
    """Per-neuron figures of one layer; every tensor is [d_mlp]."""

    key_norm: torch.Tensor
    value_norm: torch.Tensor
    alignment: torch.Tensor  # cos(k_i, v_i)
    bias: torch.Tensor | None
    up_norm: torch.Tensor | None
    up_alignment: torch.Tensor | None  # cos(u_i, v_i), gated models


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


def neuron_weights(w: LayerWeights) -> NeuronWeights:
    return NeuronWeights(
        key_norm=w.keys.double().norm(dim=1),
        value_norm=w.values.double().norm(dim=1),
        alignment=_cos(w.keys, w.values),
        bias=None if w.biases is None else w.biases.double(),
        up_norm=None if w.ups is None else w.ups.double().norm(dim=1),
        up_alignment=None if w.ups is None else _cos(w.ups, w.values),
    )


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return None if denom == 0.0 else float((x * y).sum()) / denom


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """Slope and intercept of the line y = slope * x + intercept."""
    x, y = x.double(), y.double()
    var = float(((x - x.mean()) ** 2).sum())
    if var == 0.0:
        return None, None
    slope = float(((x - x.mean()) * (y - y.mean())).sum()) / var
    return slope, float(y.mean()) - slope * float(x.mean())


def mean_offdiagonal_cosine(vectors: torch.Tensor) -> float:
    """Mean cos(a_i, a_j) over i != j, exactly: sum_ij <a_i, a_j> = ||sum_i a_i||^2 for unit rows."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    n = unit.shape[0]
    total = float(unit.sum(dim=0).pow(2).sum())
    return (total - n) / (n * (n - 1))


def histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, object]:
    """The stored histogram of one statistic over a layer's neurons (``catalog.histograms``' rule: the axis
    clipped to the 1st-99th percentiles when outliers would flatten it, the rest counted apart)."""
    return histograms.histogram(values.detach().double().cpu().numpy(), bins)


def layer_weight_stats(w: LayerWeights, n: NeuronWeights) -> dict[str, object]:
    """Seed 000's per-layer figures. Bias figures are None for models without an FFN bias."""
    stats: dict[str, object] = {
        "mean_alignment": float(n.alignment.mean()),
        "key_cosine_mean": mean_offdiagonal_cosine(w.keys),
        "value_cosine_mean": mean_offdiagonal_cosine(w.values),
        "mean_bias": None,
        "corr_bias_key_norm": None,
        "corr_bias_value_norm": None,
        "corr_bias_alignment": None,
        "bias_alignment_slope": None,
        "bias_alignment_intercept": None,
    }
    hist = {"key_norm": histogram(n.key_norm), "value_norm": histogram(n.value_norm),
            "alignment": histogram(n.alignment)}
    if n.up_alignment is not None:
        hist["up_alignment"] = histogram(n.up_alignment)
    if n.bias is not None:
        slope, intercept = least_squares(n.alignment, n.bias)
        stats.update(
            mean_bias=float(n.bias.mean()),
            corr_bias_key_norm=pearson(n.bias, n.key_norm),
            corr_bias_value_norm=pearson(n.bias, n.value_norm),
            corr_bias_alignment=pearson(n.bias, n.alignment),
            bias_alignment_slope=slope,
            bias_alignment_intercept=intercept,
        )
        hist["bias"] = histogram(n.bias)
    stats["histograms"] = hist
    return stats


@dataclass(frozen=True)
class TokenProjection:
    """v_i . E^T per neuron: highest and lowest tokens with their logits, [d_mlp, k]."""

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor


def value_logits(values: torch.Tensor, unembedding: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[d_mlp, vocab] logits of each value vector through E as stored (convention raw_unembedding),
    into ``out`` if given: a product into a kept buffer skips faulting in fresh pages (SmolLM2's
    [1536, 49152]: 311 against 421 ms)."""
    if out is None:
        return values.float() @ unembedding.float().T
    return torch.matmul(values.float(), unembedding.float().T, out=out)


def project_values(logits: torch.Tensor, top: int = 30, bottom: int = 10) -> TokenProjection:
    top, bottom = min(top, logits.shape[1]), min(bottom, logits.shape[1])  # tiny test vocabularies
    hi = torch.topk(logits, top, dim=1, largest=True, sorted=True)
    lo = torch.topk(logits, bottom, dim=1, largest=False, sorted=True)
    return TokenProjection(hi.indices, hi.values, lo.indices, lo.values)


def token_ranks(logits: torch.Tensor, token_ids: torch.Tensor, *, chunk: int = 32, cells: int = 4096) -> torch.Tensor:
    """1-based rank of token_ids[i, j] in row i of logits (1 = highest); 0 where token_ids < 0.

    Rank = 1 + number of tokens with a strictly higher logit. The row's few targets are sorted and
    each logit's bucket (the number of targets strictly below it) is counted: the count of logits
    above each target is then a suffix sum of that histogram. A logit's bucket is read off a grid of
    ``cells`` equal cells over the row's target range (``_bucket_counts``), and binary-searched only
    in the few cells that hold a target: the same counts as searching every logit, several times faster.
    """
    rows = logits.shape[0]
    valid = token_ids >= 0
    target = logits.gather(1, token_ids.clamp(min=0))
    target = torch.where(valid, target, torch.full_like(target, math.inf))  # +inf: nothing is above it
    targets, order = target.sort(dim=1)
    above = torch.empty_like(token_ids)

    def count(a: int, b: int, _: None) -> None:
        x, t = logits[a:b].contiguous(), targets[a:b].contiguous()
        # the grid needs finite logits (a finite sum says so); else every logit is searched
        hist = _bucket_counts(x, t, cells) if bool(x.sum().isfinite()) else _searched_bucket_counts(x, t)
        above[a:b].scatter_(1, order[a:b], hist.flip(1).cumsum(1).flip(1)[:, 1:])

    run_blocks(rows, chunk, count, lambda a, b: None, threaded=logits.device.type == "cpu")
    return torch.where(valid, above + 1, torch.zeros_like(above))


def _searched_bucket_counts(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[rows, n + 1]: how many logits of each row x [rows, V] have exactly k of its sorted targets
    t [rows, n] strictly below them, by a binary search per logit."""
    rows, n = t.shape
    below = torch.searchsorted(t, x, side="left", out_int32=True)
    offsets = (torch.arange(rows, dtype=torch.int32, device=x.device) * (n + 1)).unsqueeze(1)
    return torch.bincount((below + offsets).view(-1), minlength=rows * (n + 1)).view(rows, n + 1)


def _bucket_counts(x: torch.Tensor, t: torch.Tensor, cells: int) -> torch.Tensor:
    """``_searched_bucket_counts`` for finite x, without a binary search per logit (~60 ns each on CPU).

    cell(v) = clamp(trunc((v - lo) * scale), -1, cells) over the row's target range [lo, hi] is
    monotone in v, so a logit in a cell that holds no target has exactly the targets of the cells
    before its own below it. Only the logits that share a cell with some target (a few percent) are
    compared with that cell's targets, by a branchless binary search vectorised over them.
    """
    rows, n = t.shape
    width = cells + 2
    x, t = x.float(), t.float()
    lo = t[:, :1]
    hi = torch.where(t.isfinite(), t, -math.inf).amax(dim=1, keepdim=True)
    lo = torch.where(lo.isfinite(), lo, torch.zeros_like(lo))  # a row with no target: any grid
    scale = cells / (hi - lo)
    # one target (or one value), or a range too wide or too narrow for float32: any positive scale will do
    scale = torch.where(scale.isfinite() & (scale > 0), scale, torch.ones_like(scale))
    offsets = (torch.arange(rows, dtype=torch.int32, device=x.device) * width + 1).unsqueeze(1)

    def cell(v: torch.Tensor) -> torch.Tensor:  # the row's cell index, offset by row: [rows, .] int32
        return (v - lo).mul_(scale).clamp_(-1, cells).to(torch.int32).add_(offsets)

    x_cell, t_cell = cell(x).view(-1), cell(t)  # +inf targets land in the last cell, like the largest logits
    per_cell = torch.bincount(x_cell, minlength=rows * width).view(rows, width)
    targets_in = torch.bincount(t_cell.view(-1), minlength=rows * width).view(rows, width)
    before = targets_in.cumsum(1) - targets_in  # targets in the cells before each cell
    shared = targets_in > 0
    hist = torch.zeros((rows, n + 1), dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, before, torch.where(shared, 0, per_cell))
    # the logits that share a cell with a target: lower bound among that cell's targets
    at = shared.view(-1).index_select(0, x_cell).nonzero().squeeze(1)
    if at.numel():
        value = x.view(-1).index_select(0, at)
        c = x_cell.index_select(0, at).long()
        row = c // width
        first = before.view(-1).index_select(0, c)  # the cell's first target, within its row
        base, left = row * n + first, targets_in.view(-1).index_select(0, c)
        flat_t = t.reshape(-1)
        for _ in range(int(left.max()).bit_length()):
            half = left // 2
            go = (left > 0) & (flat_t.index_select(0, (base + half).clamp_(max=flat_t.numel() - 1)) < value)
            base = torch.where(go, base + half + 1, base)
            left = torch.where(go, left - half - 1, half)
        hist += torch.bincount(base - row * n + row * (n + 1), minlength=rows * (n + 1)).view(rows, n + 1)
    return hist
