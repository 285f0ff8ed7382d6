"""Matplotlib rendering of the report's figures: figure data in, PNG bytes out.

The object-oriented API on the Agg canvas only (no pyplot, no display, no global figure state), under
one lock: the UI renders from request threads. Each function draws one data class of
``catalog.report.data``; with one layer (the UI's layer page) the by-layer charts become histograms or
bars of that layer. A figure whose data has a note is not drawn (``render`` refuses it).
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything else of matplotlib is imported: no display is needed

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from catalog.report import NothingToDraw
from catalog.report import data as d
from catalog.report.captions import TITLES

DPI = 100
LABEL_COLOURS = {"shallow": "#4e79a7", "shallow+semantic": "#b07aa1", "semantic": "#f28e2b", "none": "#bab0ac",
                 d.NO_SUGGESTION: "#dddddd"}
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_LOCK = threading.Lock()


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _title(fig: Figure, key: str, ref: d.RunRef, layers: Sequence[int]) -> None:
    where = f", layer {layers[0]}" if len(layers) == 1 else ""
    fig.suptitle(f"{ref.model}{where}: {TITLES[key]}", fontsize=12)


def _layer_axis(ax: Axes, layers: Sequence[int]) -> None:
    ax.set_xlabel("layer")
    step = 1 if len(layers) <= 24 else math.ceil(len(layers) / 16)
    ax.set_xticks(list(layers)[::step])
    ax.grid(True, alpha=0.3)


def _series(ax: Axes, layers: Sequence[int], values: Sequence[float | None], label: str, colour: str,
            **kw: Any) -> bool:
    y = d.floats(values)
    if not np.isfinite(y).any():
        return False
    ax.plot(list(layers), y, marker="o", markersize=3.5, label=label, color=colour, **kw)
    return True


def _hist(ax: Axes, values: np.ndarray, colour: str, bins: int = 40) -> None:
    """A histogram on the rule of ``catalog.histograms``: when outliers would flatten it, the axis is
    clipped to the 1st-99th percentiles and the values beyond are drawn as grey bars past each end."""
    h = d.histogram(values, bins)
    edges, counts = np.array(h["edges"], dtype=np.float64), np.array(h["counts"], dtype=np.float64)
    if len(counts) == 0:
        return
    ax.stairs(counts, edges, fill=True, color=colour)
    width = float(edges[-1] - edges[0]) / len(counts)
    for side, c, x in (("below", h["below"], edges[0] - 1.5 * width), ("above", h["above"], edges[-1] + 1.5 * width)):
        if c:
            ax.bar([x], [c], width=1.6 * width, color="#bab0ac", edgecolor="#777777", linewidth=0.5)
            ax.text(x, c, f"{'<' if side == 'below' else '>'}{edges[0] if side == 'below' else edges[-1]:.3g}\n{c}",
                    ha="center", va="bottom", fontsize=7, color="#555555")
    if h["clipped"]:
        ax.text(0.99, 0.98, f"clipped to the 1st-99th percentiles: {h['below']} below, {h['above']} above (grey)",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#555555")


def _zero(ax: Axes) -> None:
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle="--")


# --- seed 000 ----------------------------------------------------------------------------------------


def bias_scatter(fig_data: d.BiasScatter, ref: d.RunRef) -> Figure:
    rows = len(fig_data.layers)
    fig = _new(12.5, 0.7 + 3.0 * rows)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, layer in enumerate(fig_data.layers):
        for c, stat in enumerate(d.WEIGHT_STATS):
            ax = axes[r][c]
            x, y = fig_data.points[layer][stat]
            keep = np.isfinite(x) & np.isfinite(y)
            n = int(keep.sum())
            size, alpha = (14.0, 0.8) if n <= 300 else (6.0, 0.5) if n <= 3000 else (3.0, 0.3)
            ax.scatter(x[keep], y[keep], s=size, alpha=alpha, color="#1f77b4", linewidths=0, rasterized=True)
            fit = fig_data.fits[layer][stat]
            if fit is not None and keep.any():
                xs = np.array([x[keep].min(), x[keep].max()])
                ax.plot(xs, fit.slope * xs + fit.intercept, color="#d62728", linewidth=1.8)
                text = f"slope {d_num(fit.slope)}\nr {d_num(fit.r)}, n = {fit.n}"
            else:
                text = "no line fitted"
            ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
            ax.set_title(f"layer {layer}: bias ~ {d.STAT_NAMES[stat]}", fontsize=9)
            ax.set_xlabel(d.STAT_NAMES[stat], fontsize=8)
            if c == 0:
                ax.set_ylabel("bias", fontsize=8)
            ax.tick_params(labelsize=7)
    _title(fig, "bias-scatter", ref, fig_data.layers if rows == 1 else [])
    return fig


def d_num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def bias_fits(fig_data: d.BiasFits, ref: d.RunRef) -> Figure:
    fig = _new(13.5, 4.0)
    a, b, c = fig.subplots(1, 3)
    layers = fig_data.layers
    _series(a, layers, fig_data.slope("alignment"), "slope of bias on alignment", SERIES_COLOURS[0])
    a.set_ylabel("slope")
    a.set_title("fitted line: bias ~ alignment", fontsize=10)
    _zero(a)
    for k, stat in enumerate(d.WEIGHT_STATS):
        _series(b, layers, fig_data.r(stat), f"bias ~ {d.STAT_NAMES[stat]}", SERIES_COLOURS[k])
    b.set_ylabel("Pearson r")
    b.set_title("correlations of bias", fontsize=10)
    b.set_ylim(-1.05, 1.05)
    _zero(b)
    b.legend(fontsize=8)
    _series(c, layers, fig_data.mean_bias, "mean bias", SERIES_COLOURS[0])
    c.set_ylabel("mean bias", color=SERIES_COLOURS[0])
    twin = c.twinx()
    _series(twin, layers, fig_data.mean_alignment, "mean alignment", SERIES_COLOURS[1])
    twin.set_ylabel("mean alignment", color=SERIES_COLOURS[1])
    c.set_title("means by layer", fontsize=10)
    for ax in (a, b, c):
        _layer_axis(ax, layers)
    _title(fig, "bias-fits", ref, [])
    return fig


def _violins(ax: Axes, layers: Sequence[int], values: dict[int, np.ndarray], colour: str) -> None:
    pos = [layer for layer in layers if len(values.get(layer, [])) > 0]
    if not pos:
        return
    parts = ax.violinplot([values[layer] for layer in pos], positions=pos, widths=0.8, showextrema=False)
    for body in parts["bodies"]:  # type: ignore[attr-defined]
        body.set_facecolor(colour)
        body.set_alpha(0.45)
    ax.scatter(pos, [float(np.mean(values[layer])) for layer in pos], s=12, color="black", zorder=3, label="mean")


def alignment(fig_data: d.Alignment, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    if len(layers) == 1:
        fig = _new(7.0, 4.0)
        ax = fig.subplots()
        _hist(ax, fig_data.values[layers[0]], "#4e79a7")
        ax.set_xlabel("alignment cos(k_i, v_i)")
        ax.set_ylabel("neurons")
    else:
        fig = _new(max(7.0, 0.32 * len(layers) + 3), 4.2)
        ax = fig.subplots()
        _violins(ax, layers, fig_data.values, "#4e79a7")
        _zero(ax)
        ax.set_ylabel("alignment cos(k_i, v_i)")
        _layer_axis(ax, layers)
        ax.legend(fontsize=8)
    _title(fig, "alignment", ref, layers)
    return fig


def cosines(fig_data: d.Cosines, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    single = len(layers) == 1
    fig = _new(12.0 if single else max(12.0, 0.55 * len(layers) + 4), 4.2)
    axes = fig.subplots(1, 2)
    for ax, (name, vals, stored, colour) in zip(axes, (
            ("keys", fig_data.keys, fig_data.stored_key_mean, "#4e79a7"),
            ("values", fig_data.values, fig_data.stored_value_mean, "#f28e2b")), strict=True):
        if single:
            _hist(ax, vals.get(layers[0], np.array([])), colour, bins=50)
            if stored[0] is not None:
                ax.axvline(stored[0], color="black", linestyle="--", label=f"mean over all pairs {stored[0]:.3g}")
                ax.legend(fontsize=8)
            ax.axvline(0.0, color="#999999", linewidth=0.8)
            ax.set_xlabel(f"cosine between two {name}")
            ax.set_ylabel("pairs")
        else:
            _violins(ax, layers, vals, colour)
            ys = d.floats(stored)
            ax.scatter(list(layers), ys, marker="D", s=18, color="#d62728", zorder=4, label="mean over all pairs")
            _zero(ax)
            ax.set_ylabel(f"cosine between two {name}")
            _layer_axis(ax, layers)
            ax.legend(fontsize=8)
        ax.set_title(f"{name} ({'M1' if name == 'keys' else 'M2'} columns)", fontsize=10)
    _title(fig, "cosines", ref, layers)
    return fig


# --- seed 001 ----------------------------------------------------------------------------------------


def _drops(values: Sequence[float | None]) -> list[float | None]:
    return [None if v is None else -100.0 * v for v in values]


def ablation(fig_data: d.Ablation, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    series = (("without the last token", fig_data.last), ("without the first token", fig_data.first),
              ("without a random other token", fig_data.random))
    fig = _new(9.0, 4.2)
    ax = fig.subplots()
    if len(layers) == 1:
        names = [n for n, _ in series]
        vals = [(_drops(v)[0]) for _, v in series]
        ax.bar(range(3), [np.nan if v is None else v for v in vals], color=SERIES_COLOURS[:3])
        ax.set_xticks(range(3), names, fontsize=8)
    else:
        for k, (name, values) in enumerate(series):
            _series(ax, layers, _drops(values), name, SERIES_COLOURS[k])
        _layer_axis(ax, layers)
    for y, text in ((60.0, "seed 001: last token, lower layers (60%+)"), (40.0, "seed 001: last token, upper (~40%)"),
                    (25.0, "seed 001: first / random (up to 25%)")):
        ax.axhline(y, color="#777777", linewidth=0.8, linestyle=":")
        ax.text(1.0, y, " " + text, transform=ax.get_yaxis_transform(), fontsize=7, va="center", color="#555555")
    _zero(ax)
    ax.set_ylabel("drop of the coefficient (%)")
    if len(layers) > 1:
        ax.legend(fontsize=8, loc="best")
    _title(fig, "ablation", ref, layers)
    return fig


def _rule_lines(ax: Axes, rule: dict[str, Any] | None, word: str) -> None:
    """Horizontal lines at the label rule's numeric thresholds whose name mentions ``word``."""
    for k, v in sorted((rule or {}).items()):
        if word in k and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            ax.axhline(float(v), color="#d62728", linewidth=0.9, linestyle="--", label=f"{k} = {v:g}")


def contrast(fig_data: d.Contrast, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    single = len(layers) == 1
    fig = _new(12.0 if single else max(12.0, 0.55 * len(layers) + 4), 4.2)
    axes = fig.subplots(1, 2)
    for ax, (name, word, vals, colour) in zip(axes, (
            ("label_contrast (last vs random other)", "contrast", fig_data.contrast, "#4e79a7"),
            ("label_context (drop without a random other)", "context", fig_data.context, "#f28e2b")), strict=True):
        if single:
            v = vals.get(layers[0], np.array([]))
            if len(v):
                _hist(ax, v, colour)
            ax.axvline(0.0, color="#999999", linewidth=0.8)
            ax.set_xlabel(name)
            ax.set_ylabel("neurons")
        else:
            pos = [layer for layer in layers if len(vals.get(layer, [])) > 0]
            if pos:
                ax.boxplot([vals[layer] for layer in pos], positions=pos, widths=0.6, showfliers=False,
                           patch_artist=True, boxprops={"facecolor": colour, "alpha": 0.5},
                           medianprops={"color": "black"})
            _zero(ax)
            _rule_lines(ax, fig_data.rule, word)
            ax.set_ylabel(name)
            _layer_axis(ax, layers)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    _title(fig, "label-contrast", ref, layers)
    return fig


AGREEMENT_NAMES = {
    "agreement": "agreement (precision@N)", "agreement_shuffled": "shuffled values (baseline)",
    "top_token_frequency": "top-token corpus frequency (chance)", "agreement_top1": "top-1 trigger agreement",
    "agreement_folded": "final-norm gain folded in", "agreement_negative": "negative triggers vs bottom tokens",
}


def agreement(fig_data: d.Agreement, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    fig = _new(13.0, 4.4)
    a, b = fig.subplots(1, 2, width_ratios=[3, 2])
    token = "next token" if ref.causal else "trigger token (encoder)"
    present = [s for s in d.AGREEMENT_SERIES if any(v is not None for v in fig_data.means[s])]
    ranks = [s for s in d.RANK_SERIES if any(v is not None for v in fig_data.medians[s])]
    if len(layers) == 1:
        vals = [fig_data.means[s][0] for s in present]
        a.bar(range(len(present)), [np.nan if v is None else v for v in vals],
              color=[SERIES_COLOURS[d.AGREEMENT_SERIES.index(s)] for s in present])
        a.set_xticks(range(len(present)), [AGREEMENT_NAMES[s] for s in present], rotation=20, ha="right", fontsize=7)
        rv = [fig_data.medians[s][0] for s in ranks]
        b.bar(range(len(ranks)), [np.nan if v is None else v for v in rv], color=SERIES_COLOURS[:len(ranks)])
        b.set_xticks(range(len(ranks)), [token, "shuffled"][:len(ranks)], fontsize=8)
    else:
        for s in present:
            _series(a, layers, fig_data.means[s], AGREEMENT_NAMES[s], SERIES_COLOURS[d.AGREEMENT_SERIES.index(s)])
        _layer_axis(a, layers)
        a.legend(fontsize=7)
        for k, s in enumerate(ranks):
            _series(b, layers, fig_data.medians[s], token if k == 0 else "shuffled values", SERIES_COLOURS[k])
        _layer_axis(b, layers)
        if ranks:
            b.legend(fontsize=8)
    plotted = [v for s in present for v in fig_data.means[s] if v is not None]
    positive = [v for v in plotted if v > 0]
    if positive and min(positive) < max(positive) / 20:
        # agreement near chance: the ratios are the point; symlog keeps zeros (no agreement) drawable
        a.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(positive))))
        a.set_ylim(bottom=0.0)
    a.set_ylabel("mean over neurons")
    a.set_title("agreement and its baselines", fontsize=10)
    b.axhline(0.5, color="#999999", linestyle="--", linewidth=0.8)
    b.set_ylim(0.0, 1.0)
    b.set_ylabel("median rank percentile (0 = top)")
    b.set_title(f"rank of the {token} in the value's distribution", fontsize=10)
    if not ranks:
        b.text(0.5, 0.5, "not stored for this run", transform=b.transAxes, ha="center", color="#777777")
    _title(fig, "agreement", ref, layers)
    return fig


def _stacked(ax: Axes, layers: Sequence[int], counts: Sequence[dict[str, int]], order: Sequence[str]) -> None:
    cats = list(order) + sorted({c for row in counts for c in row} - set(order))
    bottom = np.zeros(len(layers))
    totals = np.array([sum(row.values()) for row in counts], dtype=np.float64)
    safe = np.where(totals > 0, totals, 1.0)
    for k, cat in enumerate(cats):
        share = np.array([row.get(cat, 0) for row in counts], dtype=np.float64) / safe
        if not share.any():
            continue
        ax.bar(list(layers), share, bottom=bottom, width=0.8, label=cat,
               color=LABEL_COLOURS.get(cat, SERIES_COLOURS[k % len(SERIES_COLOURS)]))
        bottom += share
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("share")
    _layer_axis(ax, layers)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def labels(fig_data: d.Labels, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    fig = _new(max(8.0, 0.35 * len(layers) + 4), 4.2)
    ax = fig.subplots()
    _stacked(ax, layers, fig_data.counts, d.SUGGESTED_LABELS)
    if len(layers) <= 32:
        for layer, n in zip(layers, fig_data.unlabelled, strict=True):
            ax.text(layer, 1.02, str(n), ha="center", fontsize=6, color="#555555")
    ax.set_title("suggested labels (numbers: neurons without a label)", fontsize=10)
    _title(fig, "labels", ref, layers)
    return fig


def human(fig_data: d.Human, ref: d.RunRef) -> Figure:
    layers = fig_data.layers
    fig = _new(13.0, 4.6)
    a, b = fig.subplots(1, 2, width_ratios=[3, 2])
    _stacked(a, layers, fig_data.counts, d.HUMAN_LABELS)
    a.set_title("human labels (current, one per annotator and neuron)", fontsize=10)
    rows = [r for r in d.HUMAN_LABELS if r in fig_data.confusion] + sorted(set(fig_data.confusion) - set(d.HUMAN_LABELS))
    seen = {c for r in fig_data.confusion.values() for c in r}
    cols = [c for c in (*d.SUGGESTED_LABELS, d.NO_SUGGESTION) if c in seen] + sorted(
        seen - {*d.SUGGESTED_LABELS, d.NO_SUGGESTION})
    grid = np.array([[fig_data.confusion[r].get(c, 0) for c in cols] for r in rows], dtype=np.float64)
    b.imshow(grid, cmap="Blues", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            n = int(grid[i, j])
            b.text(j, i, str(n), ha="center", va="center", fontsize=9,
                   color="white" if n > grid.max() / 2 else "black")
    b.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
    b.set_yticks(range(len(rows)), rows, fontsize=8)
    b.set_xlabel("suggested label")
    b.set_ylabel("human label")
    k = fig_data.overall
    b.set_title(f"Cohen's kappa {d_num(k.kappa if k else None)} over {k.items if k else 0}", fontsize=10)
    _title(fig, "human", ref, layers)
    return fig


RENDERERS: dict[str, Callable[[Any, d.RunRef], Figure]] = {
    "bias-scatter": bias_scatter, "bias-fits": bias_fits, "alignment": alignment, "cosines": cosines,
    "ablation": ablation, "label-contrast": contrast, "agreement": agreement, "labels": labels, "human": human,
}


def render(fig_data: d.FigureData, ref: d.RunRef) -> bytes:
    """The figure as PNG bytes (NothingToDraw when its data has a note instead)."""
    if fig_data.note is not None:
        raise NothingToDraw(fig_data.note)
    with _LOCK:
        return _png(RENDERERS[fig_data.key](fig_data, ref))
