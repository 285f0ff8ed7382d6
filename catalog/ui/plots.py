"""Server-side SVG plots of the model and layer pages: pure functions from numbers to SVG text.

No database, no JavaScript: each function returns one ``<svg class="plot" role="img">`` element.
Every text that enters the SVG (titles, axis labels, legends, tooltips) is XML-escaped here, since
some of it comes from the database; only because of that may a page mark the result safe.
Coordinates are rounded to 0.1 px and numbers to 4 significant digits: a GPT-2-XL layer draws
6,400 points per scatter, and the page should stay small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from html import escape
from itertools import pairwise
from typing import Any

import numpy as np

WIDTH, HEIGHT = 600, 300
# Above this many points a scatter draws bare circles: a tooltip per point would triple the page.
TOOLTIP_LIMIT = 2000
LEGEND_WIDTH = 175  # right margin of plots with a legend: room for about 24 characters
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
LABEL_COLOURS = {"shallow": "#4e79a7", "shallow+semantic": "#b07aa1", "semantic": "#f28e2b", "none": "#bab0ac"}
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def esc(text: object) -> str:
    """XML-escape a text for element content and attribute values (quotes included)."""
    return escape(str(text), quote=True)


def num(v: float) -> str:
    """A data value as shown to a reader: 4 significant digits, no '-0'."""
    s = f"{v:.4g}"
    return "0" if s in ("-0", "0") else s


def _px(v: float) -> str:
    return f"{v:.1f}"


def _finite(v: object) -> bool:
    return isinstance(v, int | float | np.floating | np.integer) and math.isfinite(float(v))


# --- scales and ticks -------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (about n of them); the range is widened where equal."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


@dataclass(frozen=True)
class Scale:
    """Linear map of the data interval [lo, hi] onto the pixel interval [a, b]."""

    lo: float
    hi: float
    a: float
    b: float

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) * (self.b - self.a) / (self.hi - self.lo)


@dataclass(frozen=True)
class Frame:
    """The plot area inside the SVG: pixel box and the two scales with their ticks."""

    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    x: Scale
    y: Scale
    x_ticks: list[float]
    y_ticks: list[float]


def layer_ticks(xs: Sequence[float], pad: float) -> tuple[float, float, list[float]]:
    """An axis of layer indices: the domain [first - pad, last + pad] and integer ticks (every layer
    when there are few, else a round step)."""
    lo, hi = float(min(xs)) - pad, float(max(xs)) + pad
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = max(xs) - min(xs)
    step = 1 if span <= 24 else int(nice_ticks(0, span, 8, integer=True)[1])
    return lo, hi, [float(t) for t in range(math.ceil(lo), math.floor(hi) + 1) if t % step == 0]


def frame(xs: Iterable[float], ys: Iterable[float], *, width: int = WIDTH, height: int = HEIGHT,
          margin_right: float = 16, margin_bottom: float = 44, layer_pad: float | None = None,
          y_range: tuple[float, float] | None = None, y_integer: bool = False) -> Frame:
    """Scales fitted to the data's extent and widened to round ticks; with ``layer_pad`` the x axis
    is one of layer indices (integer ticks, the domain padded by that much)."""
    xv, yv = list(xs), list(ys)
    if layer_pad is None:
        xt = nice_ticks(min(xv), max(xv), 6)
        x_lo, x_hi = xt[0], xt[-1]
    else:
        x_lo, x_hi, xt = layer_ticks(xv, layer_pad)
    yt = nice_ticks(*(y_range or (min(yv), max(yv))), 5, integer=y_integer)
    left, top = 62.0, 28.0
    right, bottom = width - margin_right, height - margin_bottom
    return Frame(width, height, left, right, top, bottom,
                 Scale(x_lo, x_hi, left, right), Scale(yt[0], yt[-1], bottom, top), xt, yt)


def _axes(f: Frame, x_label: str, y_label: str, *, x_fmt: str = "num", y_fmt: str = "num") -> list[str]:
    out = ['<g class="grid" stroke="#e5e5e5" stroke-width="1">']
    out += [f'<line x1="{_px(f.left)}" x2="{_px(f.right)}" y1="{_px(f.y(t))}" y2="{_px(f.y(t))}"/>'
            for t in f.y_ticks]
    out.append("</g>")
    out.append(f'<g class="axis" stroke="#555" stroke-width="1"><line x1="{_px(f.left)}" x2="{_px(f.right)}" '
               f'y1="{_px(f.bottom)}" y2="{_px(f.bottom)}"/><line x1="{_px(f.left)}" x2="{_px(f.left)}" '
               f'y1="{_px(f.top)}" y2="{_px(f.bottom)}"/>')
    out += [f'<line x1="{_px(f.x(t))}" x2="{_px(f.x(t))}" y1="{_px(f.bottom)}" y2="{_px(f.bottom + 4)}"/>'
            for t in f.x_ticks]
    out.append("</g>")
    out.append('<g class="ticks" fill="#333">')
    out += [f'<text x="{_px(f.x(t))}" y="{_px(f.bottom + 15)}" text-anchor="middle">{esc(_fmt(t, x_fmt))}</text>'
            for t in f.x_ticks]
    out += [f'<text x="{_px(f.left - 6)}" y="{_px(f.y(t) + 4)}" text-anchor="end">{esc(_fmt(t, y_fmt))}</text>'
            for t in f.y_ticks]
    out.append("</g>")
    mid_x, mid_y = (f.left + f.right) / 2, (f.top + f.bottom) / 2
    out.append(f'<text class="axis-label" x="{_px(mid_x)}" y="{_px(f.bottom + 30)}" text-anchor="middle" '
               f'fill="#333">{esc(x_label)}</text>')
    out.append(f'<text class="axis-label" x="14" y="{_px(mid_y)}" text-anchor="middle" fill="#333" '
               f'transform="rotate(-90 14 {_px(mid_y)})">{esc(y_label)}</text>')
    return out


def _fmt(v: float, how: str) -> str:
    if how == "pct":
        return f"{v * 100:.0f}%"
    if how == "int":
        return str(round(v))
    return num(v)


def _svg(kind: str, label: str, body: list[str], *, width: int, height: int, title: str,
         attrs: Mapping[str, str] | None = None) -> str:
    """The root element: role=img with an accessible name, the title drawn at the top."""
    extra = "".join(f' {k}="{esc(v)}"' for k, v in (attrs or {}).items())
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot plot-{kind}" role="img" '
            f'aria-label="{esc(label)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'{FONT}{extra}><title>{esc(label)}</title>'
            f'<text class="plot-title" x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" '
            f'font-weight="600" fill="#222">{esc(title)}</text>')
    return head + "".join(body) + "</svg>"


def no_data(title: str, message: str = "no data", *, width: int = WIDTH) -> str:
    """A small SVG saying there is nothing to draw (and why, when the caller knows)."""
    body = [f'<text class="no-data" x="{width / 2:.0f}" y="44" text-anchor="middle" fill="#777">{esc(message)}</text>']
    return _svg("empty", f"{title}: {message}", body, width=width, height=60, title=title)


# --- scatter with a least-squares line ------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Least-squares line y = slope * x + intercept and Pearson's r (None where y is constant)."""

    slope: float
    intercept: float
    r: float | None
    n: int

    def describe(self) -> str:
        r = "undefined" if self.r is None else f"{self.r:.3f}"
        return f"fitted line: slope {num(self.slope)}, intercept {num(self.intercept)}, Pearson r {r}, n = {self.n}"


def finite_pairs(xs: Sequence[float | None], ys: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs where both are finite numbers: None and NaN are skipped."""
    x = np.array([v if v is not None else np.nan for v in xs], dtype=np.float64)
    y = np.array([v if v is not None else np.nan for v in ys], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def fit_line(xs: Sequence[float | None], ys: Sequence[float | None]) -> Fit | None:
    """The least-squares fit of y on x over finite pairs; None with fewer than 2 or a constant x."""
    x, y = finite_pairs(xs, ys)
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0:
        return None
    slope = float(dx @ dy) / sxx
    r = float(dx @ dy) / math.sqrt(sxx * syy) if syy > 0.0 else None
    return Fit(slope, float(y.mean()) - slope * float(x.mean()), r, len(x))


def scatter(xs: Sequence[float | None], ys: Sequence[float | None], *, title: str, x_label: str, y_label: str,
            ids: Sequence[int] | None = None, id_name: str = "neuron", width: int = WIDTH,
            height: int = HEIGHT + 20) -> str:
    """Points (one <circle> each) with the least-squares line; slope, intercept and r printed below."""
    x, y = finite_pairs(xs, ys)
    if len(x) == 0:
        return no_data(title)
    fit = fit_line(xs, ys)
    y_ext = [float(y.min()), float(y.max())]
    x_lo, x_hi = float(x.min()), float(x.max())
    if fit is not None:  # keep the whole fitted segment inside the plot
        y_ext += [fit.slope * x_lo + fit.intercept, fit.slope * x_hi + fit.intercept]
    f = frame([x_lo, x_hi], y_ext, width=width, height=height, margin_bottom=62)
    body = _axes(f, x_label, y_label)
    kept_ids: list[int] | None = None
    if ids is not None and len(x) <= TOOLTIP_LIMIT:
        all_x, all_y = xs, ys
        kept_ids = [i for i, a, b in zip(ids, all_x, all_y, strict=True) if _finite(a) and _finite(b)]
    radius = "2.2" if len(x) <= TOOLTIP_LIMIT else "1.3"
    body.append('<g class="points" fill="#1f77b4" fill-opacity="0.55">')
    for k, (a, b) in enumerate(zip(x.tolist(), y.tolist(), strict=True)):
        cx, cy = _px(f.x(a)), _px(f.y(b))
        if kept_ids is not None:
            tip = f"{id_name} {kept_ids[k]}: {x_label} {num(a)}, {y_label} {num(b)}"
            body.append(f'<circle cx="{cx}" cy="{cy}" r="{radius}"><title>{esc(tip)}</title></circle>')
        else:
            body.append(f'<circle cx="{cx}" cy="{cy}" r="{radius}"/>')
    body.append("</g>")
    attrs = {"data-n": str(len(x))}
    if fit is not None:
        body.append(f'<line class="fit" x1="{_px(f.x(x_lo))}" y1="{_px(f.y(fit.slope * x_lo + fit.intercept))}" '
                    f'x2="{_px(f.x(x_hi))}" y2="{_px(f.y(fit.slope * x_hi + fit.intercept))}" stroke="#d62728" '
                    f'stroke-width="2"/>')
        caption = fit.describe()
        attrs.update({"data-slope": repr(fit.slope), "data-intercept": repr(fit.intercept),
                      "data-r": "" if fit.r is None else repr(fit.r)})
    else:
        caption = f"no line fitted: {'one point' if len(x) == 1 else 'all x values are equal'} (n = {len(x)})"
    body.append(f'<text class="fit-caption" x="{_px(f.left)}" y="{height - 8}" fill="#333">{esc(caption)}</text>')
    return _svg("scatter", f"{title} (scatter, n = {len(x)})", body, width=width, height=height, title=title,
                attrs=attrs)


# --- lines over layers ----------------------------------------------------------------------------


def _runs(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split a series into its runs of consecutive present values (a None breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for xv, yv in points:
        if yv is None or not _finite(yv):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((xv, float(yv)))
    return [r for r in runs if r]


def _legend(items: Sequence[tuple[str, str]], x: float, y: float, *, chars: int = 24) -> list[str]:
    """Swatches and names at the right; a long name is cut (whole in its tooltip)."""
    out = ['<g class="legend" fill="#333">']
    for k, (name, colour) in enumerate(items):
        yy = y + 16 * k
        shown = name if len(name) <= chars else name[: chars - 1] + "…"
        out.append(f'<rect x="{_px(x)}" y="{_px(yy - 9)}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{_px(x + 14)}" y="{_px(yy)}"><title>{esc(name)}</title>{esc(shown)}</text>')
    out.append("</g>")
    return out


def line_chart(series: Mapping[str, Sequence[float | None]], *, title: str, y_label: str, x_label: str = "layer",
               xs: Sequence[int] | None = None, width: int = WIDTH, height: int = HEIGHT) -> str:
    """One line per series over layers (x = layer index unless ``xs``); None/NaN values leave a gap."""
    n = max((len(v) for v in series.values()), default=0)
    x_values = list(xs) if xs is not None else list(range(n))
    present = [float(v) for vals in series.values() for v in vals if v is not None and _finite(v)]
    if not present or not x_values:
        return no_data(title)
    f = frame(x_values, present, width=width, height=height, margin_right=LEGEND_WIDTH, layer_pad=0.3)
    body = _axes(f, x_label, y_label)
    if f.y.lo < 0 < f.y.hi:  # correlations and slopes: the sign is the point
        body.append(f'<line class="zero" x1="{_px(f.left)}" x2="{_px(f.right)}" y1="{_px(f.y(0))}" '
                    f'y2="{_px(f.y(0))}" stroke="#999" stroke-dasharray="4 3"/>')
    legend = []
    for k, (name, values) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        has_data = any(v is not None and _finite(v) for v in values)
        legend.append((name if has_data else f"{name} (no data)", colour))
        body.append(f'<g class="series" stroke="{colour}" fill="{colour}">')
        for run in _runs(list(zip(x_values, values, strict=False))):
            pts = " ".join(f"{_px(f.x(a))},{_px(f.y(b))}" for a, b in run)
            body.append(f'<polyline points="{pts}" fill="none" stroke-width="2"/>')
            for a, b in run:
                tip = f"{name}, {x_label} {a:g}: {num(b)}"
                body.append(f'<circle class="marker" cx="{_px(f.x(a))}" cy="{_px(f.y(b))}" r="2.5">'
                            f'<title>{esc(tip)}</title></circle>')
        body.append("</g>")
    body += _legend(legend, f.right + 14, f.top + 10)
    return _svg("lines", f"{title} (line chart by {x_label})", body, width=width, height=height, title=title)


# --- stacked shares by layer ------------------------------------------------------------------------


def stacked_bars(counts: Sequence[Mapping[str, int]], *, title: str, categories: Sequence[str] = (),
                 x_label: str = "layer", xs: Sequence[int] | None = None, width: int = WIDTH,
                 height: int = HEIGHT) -> str:
    """One bar per layer split into the shares of each category (counts -> fractions of the bar)."""
    cats = list(categories) + sorted({c for row in counts for c in row} - set(categories))
    x_values = list(xs) if xs is not None else list(range(len(counts)))
    if not counts or not any(sum(row.values()) for row in counts) or len(x_values) != len(counts):
        return no_data(title)
    f = frame(x_values, [0.0, 1.0], width=width, height=height, margin_right=LEGEND_WIDTH, layer_pad=0.5,
              y_range=(0.0, 1.0))
    body = _axes(f, x_label, "share", y_fmt="pct")
    bar_w = max(1.0, (f.x(1.0) - f.x(0.0)) * 0.8)
    body.append('<g class="bars">')
    for xv, row in zip(x_values, counts, strict=True):
        total = sum(row.values())
        if total == 0:
            body.append(f'<rect class="empty" x="{_px(f.x(xv) - bar_w / 2)}" y="{_px(f.top)}" width="{_px(bar_w)}" '
                        f'height="{_px(f.bottom - f.top)}" fill="none" stroke="#ccc" stroke-dasharray="3 3" '
                        f'data-layer="{xv}" data-count="0"><title>{esc(f"{x_label} {xv}: none")}</title></rect>')
            continue
        bottom = 0.0
        for k, cat in enumerate(cats):
            c = row.get(cat, 0)
            if c == 0:
                continue
            share = c / total
            y0, y1 = f.y(bottom + share), f.y(bottom)
            colour = LABEL_COLOURS.get(cat, PALETTE[k % len(PALETTE)])
            tip = f"{x_label} {xv}, {cat}: {c} of {total} ({share:.1%})"
            x0 = f.x(xv) - bar_w / 2
            body.append(f'<rect x="{_px(x0)}" y="{_px(y0)}" width="{_px(bar_w)}" height="{_px(y1 - y0)}" '
                        f'fill="{colour}" data-layer="{xv}" data-label="{esc(cat)}" data-count="{c}">'
                        f'<title>{esc(tip)}</title></rect>')
            if y1 - y0 >= 13 and bar_w >= 26:  # label a share where it fits
                body.append(f'<text class="share" x="{_px(f.x(xv))}" y="{_px((y0 + y1) / 2 + 4)}" '
                            f'text-anchor="middle" fill="#fff" font-size="10">{share:.0%}</text>')
            bottom += share
    body.append("</g>")
    body += _legend([(c, LABEL_COLOURS.get(c, PALETTE[k % len(PALETTE)])) for k, c in enumerate(cats)],
                    f.right + 14, f.top + 10)
    return _svg("bars", f"{title} (stacked shares by {x_label})", body, width=width, height=height, title=title)


# --- histogram ------------------------------------------------------------------------------------


OVERFLOW_COLOUR = "#bab0ac"
OVERFLOW_PX = 34  # room at each end of a clipped histogram for its overflow bar


def histogram(hist: Mapping[str, Any] | None, *, title: str, x_label: str, y_label: str = "neurons",
              width: int = WIDTH, height: int = HEIGHT) -> str:
    """Bars of a histogram in ``catalog.histograms``' format (``{"edges": [b+1 floats], "counts": [b ints]}``,
    optionally ``below``/``above``: values beyond a clipped axis). Values below or above the clipped range
    are drawn as a grey bar at that end of the axis (``data-overflow``), outside the scale: the x ticks
    cover the bins only."""
    if not hist:
        return no_data(title)
    edges = [float(e) for e in hist.get("edges", [])]
    counts = [int(c) for c in hist.get("counts", [])]
    below, above = int(hist.get("below") or 0), int(hist.get("above") or 0)
    well_formed = (len(edges) == len(counts) + 1 and bool(counts) and all(map(math.isfinite, edges))
                   and all(a <= b for a, b in pairwise(edges)))
    if not well_formed:
        return no_data(title, "no data (malformed histogram)")
    if edges[-1] == edges[0]:  # every value equal: give the bins a width around it
        pad = abs(edges[0]) * 0.1 or 0.5
        edges = np.linspace(edges[0] - pad, edges[0] + pad, len(counts) + 1).tolist()
    total = sum(counts) + below + above
    if total == 0:
        return no_data(title)
    f = frame([edges[0], edges[-1]], [0.0, float(max(counts + [below, above]))], width=width, height=height,
              y_integer=True)
    if below or above:  # the bins' scale stops at the clipped range; each overflow bar gets a slot outside it
        a, b = f.left + (OVERFLOW_PX if below else 0), f.right - (OVERFLOW_PX if above else 0)
        slack = 1e-9 * max(abs(edges[0]), abs(edges[-1]))
        ticks = [t for t in f.x_ticks if edges[0] - slack <= t <= edges[-1] + slack]
        f = replace(f, x=Scale(edges[0], edges[-1], a, b), x_ticks=ticks or [edges[0], edges[-1]])
    body = _axes(f, x_label, y_label)
    body.append('<g class="bars" fill="#4e79a7">')
    for k, c in enumerate(counts):
        if c == 0:
            continue
        lo, hi = edges[k], edges[k + 1]
        x0, x1 = f.x(lo), f.x(hi)
        y0 = f.y(c)
        closing = "]" if k == len(counts) - 1 else ")"
        tip = f"{x_label} in [{num(lo)}, {num(hi)}{closing}: {c}"
        body.append(f'<rect x="{_px(x0)}" y="{_px(y0)}" width="{_px(max(x1 - x0 - 0.5, 0.5))}" '
                    f'height="{_px(f.bottom - y0)}" data-count="{c}"><title>{esc(tip)}</title></rect>')
    body.append("</g>")
    label = f"{title} (histogram, n = {total})"
    if below or above:
        body.append(f'<g class="overflow" fill="{OVERFLOW_COLOUR}">')
        for side, c, x0 in (("below", below, f.left + 4), ("above", above, f.right - OVERFLOW_PX + 4)):
            if not c:
                continue
            edge = edges[0] if side == "below" else edges[-1]
            extreme = hist.get("min" if side == "below" else "max")
            beyond = (f" ({'down' if side == 'below' else 'up'} to {num(float(extreme))})"
                      if extreme is not None and _finite(extreme) else "")
            tip = f"{x_label} {'<' if side == 'below' else '>'} {num(edge)}{beyond}: {c} (outside the clipped axis)"
            y0 = f.y(c)
            body.append(f'<rect x="{_px(x0)}" y="{_px(y0)}" width="{_px(OVERFLOW_PX - 8)}" '
                        f'height="{_px(f.bottom - y0)}" data-count="{c}" data-overflow="{side}">'
                        f'<title>{esc(tip)}</title></rect>')
            body.append(f'<text x="{_px(x0 + (OVERFLOW_PX - 8) / 2)}" y="{_px(y0 - 3)}" text-anchor="middle" '
                        f'font-size="9" fill="#555">{"&lt;" if side == "below" else "&gt;"}{esc(num(edge))}</text>')
        body.append("</g>")
        label += f", {below} below and {above} above the clipped axis [{num(edges[0])}, {num(edges[-1])}]"
    return _svg("histogram", label, body, width=width, height=height, title=title,
                attrs={"data-n": str(total), "data-below": str(below), "data-above": str(above)})
