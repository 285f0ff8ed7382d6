"""Histograms of per-neuron figures, with the axis clipped to quantiles when outliers would flatten them.

One home for the binning used everywhere a distribution over neurons is shown: the stored weight
histograms (``layers.histograms``, written at extraction), the ones the layer page computes from the
corpus statistics, and the API's ``/layers`` response. numpy only (the read side never loads torch).

The rule: ``BINS`` equal-width bins over [min, max], unless the full span is more than
``CLIP_FACTOR`` times the span between the ``CLIP_QUANTILES`` (1st and 99th percentiles); then the
bins cover [q01, q99] only and the values beyond are counted apart, in ``below`` and ``above`` (a
single tiny coefficient once made one layer's ablation histogram run -40..0 with every neuron in one
bin). A histogram is::

    {"edges": [BINS + 1 floats], "counts": [BINS ints], "below": int, "above": int,
     "min": float, "max": float, "clipped": bool, "quantiles": [0.01, 0.99], "n": int}

``counts`` + ``below`` + ``above`` count every finite value (``n``); the last bin is closed. When
``clipped`` is false, ``below`` and ``above`` are 0 and the edges run from ``min`` to ``max``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BINS = 40
CLIP_QUANTILES = (0.01, 0.99)
CLIP_FACTOR = 3.0


def histogram(values: Any, bins: int = BINS) -> dict[str, Any]:
    """The histogram of the finite ``values`` (any array-like), clipped by the module's rule."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    lo_q, hi_q = CLIP_QUANTILES
    if len(v) == 0:
        return {"edges": [], "counts": [], "below": 0, "above": 0, "min": None, "max": None, "clipped": False,
                "quantiles": [lo_q, hi_q], "n": 0}
    vmin, vmax = float(v.min()), float(v.max())
    q_lo, q_hi = (float(q) for q in np.quantile(v, [lo_q, hi_q]))
    clipped = q_hi > q_lo and (vmax - vmin) > CLIP_FACTOR * (q_hi - q_lo)
    lo, hi = (q_lo, q_hi) if clipped else (vmin, vmax)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    below, above = int((v < lo).sum()), int((v > hi).sum())
    counts, edges = np.histogram(v[(v >= lo) & (v <= hi)], bins=bins, range=(lo, hi))
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts], "below": below, "above": above,
            "min": vmin, "max": vmax, "clipped": bool(clipped), "quantiles": [lo_q, hi_q], "n": len(v)}


def normalised(hist: Mapping[str, Any]) -> dict[str, Any]:
    """A stored histogram in the current format: runs made before clipping existed stored only
    ``edges`` and ``counts`` over the full [min, max] range, which is what the added fields say."""
    out = dict(hist)
    edges, counts = list(out.get("edges") or []), list(out.get("counts") or [])
    out.setdefault("below", 0)
    out.setdefault("above", 0)
    out.setdefault("clipped", False)
    out.setdefault("quantiles", list(CLIP_QUANTILES))
    out.setdefault("min", edges[0] if edges else None)
    out.setdefault("max", edges[-1] if edges else None)
    out.setdefault("n", int(sum(counts)) + int(out["below"]) + int(out["above"]))
    return out


def clip_note(hist: Mapping[str, Any], fmt: Any = "{:.4g}".format) -> str:
    """One sentence saying how a clipped histogram's axis was cut ('' when it was not)."""
    if not hist.get("clipped"):
        return ""
    edges = hist.get("edges") or []
    if not edges:
        return ""
    lo_q, hi_q = hist.get("quantiles") or CLIP_QUANTILES
    return (f"The axis is clipped to the {_ordinal(lo_q)}-{_ordinal(hi_q)} percentile range "
            f"[{fmt(edges[0])}, {fmt(edges[-1])}]: {int(hist.get('below', 0))} value(s) below it (down to "
            f"{fmt(hist.get('min'))}) and {int(hist.get('above', 0))} above it (up to {fmt(hist.get('max'))}) "
            "are drawn as the grey end bars.")


def _ordinal(q: float) -> str:
    n = round(float(q) * 100)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
