"""The findings report's figure data: one query per figure, and pure functions from its rows to the
numbers a figure draws and its caption states.

Every ``fetch_*`` function runs one query on the session it is given (the caller owns the session);
every ``*_data`` function is pure (rows in, a frozen dataclass out) so the numbers can be checked
against an independent computation over the same rows. No torch and no matplotlib here.

A figure that has nothing to draw (a model without FFN bias, a weights-only run, a column the run
did not fill, no annotations yet) still gets its data object, with ``note`` saying why; renderers and
pages show the note instead of an empty plot.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, func, select, text
from sqlalchemy.orm import Session

from catalog import histograms as hist_rule
from catalog import vocab
from catalog.annotations.agreement import cohen_kappa
from catalog.read.catalog import require_run
from catalog.store.models import Annotation, Layer, Neuron

FloatArray = npt.NDArray[np.float64]

# Where a figure's claim comes from (the seed documents in shared/seeds/).
SEED_000 = "seed 000 (R. Claus, \"Feed Forward Network Parameters\")"
SEED_001 = "seed 001 (Geva et al. 2021, \"Transformer Feed-Forward Layers Are Key-Value Memories\", as presented)"

NO_BIAS = ("no bias: this model's feed-forward layers have no bias (as in the LLaMA family), so seed 000's "
           "bias figures (bias against key norm, value norm and alignment) do not apply and are not drawn.")
NO_CORPUS = "no corpus pass: this run was made from the weights only, so it has no seed 001 figures."
ENCODER = ("this is an encoder (not causal): a trigger is a token position read from both sides, so there is "
           "no next token to agree with.")
ENCODER_ABLATION = ("this is an encoder (not causal): a trigger is a token position read from both sides, so it has "
                    "no prefix ablations and no suggested label (removing a token changes every position's context).")
NO_ANNOTATIONS = "no annotations yet: annotators' labels appear here once the review queue has some."

WEIGHT_STATS = ("key_norm", "value_norm", "alignment")  # bias against these (seed 000, Figure 1)
STAT_NAMES = {"key_norm": "key norm", "value_norm": "value norm", "alignment": "alignment"}
SUGGESTED_LABELS = tuple(x.value for x in vocab.LABEL_SCALE)  # shallow to semantic
HUMAN_LABELS = (*SUGGESTED_LABELS, vocab.HumanLabel.none.value)
NO_SUGGESTION = "(no suggested label)"
# At most this many layers in the bias small multiples of a model (first and last always among them).
SCATTER_LAYERS = 6
# Pairs of columns per layer whose cosine the distribution figure draws; all pairs when there are fewer.
COSINE_PAIRS = 5000
COSINE_SEED = 0


# --- the run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRef:
    """The catalog entry and its current run, as the figures need them."""

    model: str
    model_id: int
    run_id: int
    n_layers: int
    d_mlp: int
    family: str
    gated: bool
    causal: bool
    has_corpus: bool
    label_rule: dict[str, Any] | None
    corpus: dict[str, Any] | None
    parameters: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return list(range(self.n_layers))


def run_ref(session: Session, name: str) -> RunRef:
    """The entry named ``name`` and its published run (NotFound otherwise)."""
    entry, run = require_run(session, name)
    return RunRef(
        model=entry.name, model_id=entry.id, run_id=run.id, n_layers=entry.n_layers, d_mlp=entry.d_mlp,
        family=entry.family, gated=bool(entry.gated), causal=bool(getattr(entry, "causal", True)),
        has_corpus=bool(run.corpus), label_rule=getattr(run, "label_rule", None), corpus=run.corpus,
        parameters=dict(run.parameters or {}),
    )


def annotation_stamp(session: Session, ref: RunRef) -> tuple[int, int, str]:
    """Changes whenever the entry's annotations do (count, newest id, latest update): the cache key
    part of the figures that draw human labels."""
    n, newest, updated = session.execute(
        select(func.count(), func.max(Annotation.id), func.max(Annotation.updated_at))
        .where(Annotation.model_id == ref.model_id)
    ).one()
    return int(n), int(newest or 0), str(updated)


# --- numbers ---------------------------------------------------------------------------------------


def floats(values: Iterable[float | None]) -> FloatArray:
    """A float64 array, None as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def finite(a: FloatArray) -> FloatArray:
    return a[np.isfinite(a)]


def nanmean(a: FloatArray) -> float | None:
    v = finite(a)
    return float(v.mean()) if len(v) else None


def nanmedian(a: FloatArray) -> float | None:
    v = finite(a)
    return float(np.median(v)) if len(v) else None


def histogram(a: FloatArray, bins: int = hist_rule.BINS) -> dict[str, Any]:
    """A one-layer figure's histogram: ``catalog.histograms``' bins, the axis clipped to the 1st-99th
    percentiles when outliers would flatten it (the values beyond counted in ``below``/``above``)."""
    return hist_rule.histogram(a, bins)


def clip_notes(named: Sequence[tuple[str, FloatArray]], bins: int = hist_rule.BINS) -> str:
    """' <name>: <how its axis was clipped>' for each named histogram that was clipped ('' if none)."""
    notes = [f"{name}: {note}" for name, v in named if (note := hist_rule.clip_note(histogram(v, bins)))]
    return "".join(f" {n}" for n in notes)


@dataclass(frozen=True)
class Fit:
    """Least-squares line y = slope * x + intercept over the finite pairs, and Pearson's r (None
    where y is constant)."""

    slope: float
    intercept: float
    r: float | None
    n: int


def least_squares(x: FloatArray, y: FloatArray) -> Fit | None:
    """The fit of y on x over pairs where both are finite; None with fewer than 2 or a constant x."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0.0:
        return None
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0.0 else None
    return Fit(slope, float(y.mean()) - slope * float(x.mean()), r, len(x))


def spread_layers(n_layers: int, k: int = SCATTER_LAYERS) -> list[int]:
    """At most ``k`` layers spread evenly from the first to the last."""
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({round(float(v)) for v in np.linspace(0, n_layers - 1, k)})


def thirds(layers: Sequence[int], values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean of the values over the first third and over the last third of the layers (at least one
    layer each); None where a third has no value. Used to say whether a trend is there."""
    n = len(layers)
    if n == 0:
        return None, None
    k = max(1, n // 3)
    return nanmean(floats(values[:k])), nanmean(floats(values[n - k:]))


def _by_layer(rows: Iterable[Sequence[Any]], layers: Sequence[int], width: int) -> dict[int, list[FloatArray]]:
    """Rows (layer, v1..v_width) -> layer -> [array of v1, ..., array of v_width] (None as NaN)."""
    cols: dict[int, list[list[float | None]]] = {layer: [[] for _ in range(width)] for layer in layers}
    for row in rows:
        target = cols.get(int(row[0]))
        if target is None:
            continue
        for k in range(width):
            target[k].append(row[k + 1])
    return {layer: [floats(c) for c in cs] for layer, cs in cols.items()}


# --- figure data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureData:
    """What one figure draws. ``note`` (None when there is something to draw) says why not."""

    key: str
    layers: list[int]
    note: str | None

    def summary(self) -> dict[str, Any]:
        """The figure's numbers as JSON-able values (what the caption states and a reader may check)."""
        return {}


def _fit_json(f: Fit | None) -> dict[str, Any] | None:
    return None if f is None else {"slope": f.slope, "intercept": f.intercept, "r": f.r, "n": f.n}


# seed 000, Figure 1: bias against key norm / value norm / alignment, with the fitted line


@dataclass(frozen=True)
class BiasScatter(FigureData):
    points: dict[int, dict[str, tuple[FloatArray, FloatArray]]] = field(default_factory=dict)  # layer -> stat -> (x, bias)
    fits: dict[int, dict[str, Fit | None]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"fits": {str(layer): {s: _fit_json(f) for s, f in by.items()} for layer, by in self.fits.items()}}


def fetch_weight_stats(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, bias, key_norm, value_norm, alignment) of every neuron of ``layers``."""
    return [tuple(r) for r in session.execute(
        select(Neuron.layer, Neuron.bias, Neuron.key_norm, Neuron.value_norm, Neuron.alignment)
        .where(Neuron.run_id == ref.run_id, Neuron.layer.in_(list(layers)))
        .order_by(Neuron.layer, Neuron.neuron)
    ).tuples()]


def bias_scatter_data(rows: Sequence[Sequence[Any]], layers: Sequence[int]) -> BiasScatter:
    cols = _by_layer(rows, layers, 4)
    if not any(np.isfinite(c[0]).any() for c in cols.values()):
        return BiasScatter("bias-scatter", list(layers), NO_BIAS)
    points = {layer: {s: (c[k + 1], c[0]) for k, s in enumerate(WEIGHT_STATS)} for layer, c in cols.items()}
    fits = {layer: {s: least_squares(x, y) for s, (x, y) in by.items()} for layer, by in points.items()}
    return BiasScatter("bias-scatter", list(layers), None, points, fits)


# seed 000, Figure 2: the fitted line's slope, the correlations and the means by layer


@dataclass(frozen=True)
class BiasFits(FigureData):
    fits: dict[str, list[Fit | None]] = field(default_factory=dict)  # stat -> by layer
    mean_bias: list[float | None] = field(default_factory=list)
    mean_alignment: list[float | None] = field(default_factory=list)

    def slope(self, stat: str) -> list[float | None]:
        return [None if f is None else f.slope for f in self.fits.get(stat, [])]

    def r(self, stat: str) -> list[float | None]:
        return [None if f is None else f.r for f in self.fits.get(stat, [])]

    def summary(self) -> dict[str, Any]:
        return {"slope": {s: self.slope(s) for s in self.fits}, "r": {s: self.r(s) for s in self.fits},
                "intercept": {s: [None if f is None else f.intercept for f in fs] for s, fs in self.fits.items()},
                "mean_bias": self.mean_bias, "mean_alignment": self.mean_alignment}


def bias_fits_data(rows: Sequence[Sequence[Any]], layers: Sequence[int]) -> BiasFits:
    cols = _by_layer(rows, layers, 4)
    if not any(np.isfinite(c[0]).any() for c in cols.values()):
        return BiasFits("bias-fits", list(layers), NO_BIAS)
    fits = {s: [least_squares(cols[layer][k + 1], cols[layer][0]) for layer in layers]
            for k, s in enumerate(WEIGHT_STATS)}
    return BiasFits("bias-fits", list(layers), None, fits, [nanmean(cols[layer][0]) for layer in layers],
                    [nanmean(cols[layer][3]) for layer in layers])


# seed 000, Figure 1 (alignment clusters): the distribution of alignment by layer


@dataclass(frozen=True)
class Alignment(FigureData):
    values: dict[int, FloatArray] = field(default_factory=dict)
    mean: list[float | None] = field(default_factory=list)
    positive_share: list[float | None] = field(default_factory=list)
    gated: bool = False

    def summary(self) -> dict[str, Any]:
        return {"mean": self.mean, "positive_share": self.positive_share,
                "quantiles": {str(layer): _quantiles(v) for layer, v in self.values.items()}}


def _quantiles(v: FloatArray, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float] | None:
    f = finite(v)
    return None if len(f) == 0 else {f"q{round(q * 100):02d}": float(np.quantile(f, q)) for q in qs}


def fetch_alignment(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, alignment) of every neuron of ``layers``."""
    return [tuple(r) for r in session.execute(
        select(Neuron.layer, Neuron.alignment)
        .where(Neuron.run_id == ref.run_id, Neuron.layer.in_(list(layers)))
        .order_by(Neuron.layer, Neuron.neuron)
    ).tuples()]


def alignment_data(rows: Sequence[Sequence[Any]], layers: Sequence[int], *, gated: bool) -> Alignment:
    cols = _by_layer(rows, layers, 1)
    values = {layer: finite(c[0]) for layer, c in cols.items()}
    if not any(len(v) for v in values.values()):
        return Alignment("alignment", list(layers), "no alignment stored for this run.", gated=gated)
    return Alignment("alignment", list(layers), None, values,
                     [float(v.mean()) if len(v) else None for v in values.values()],
                     [float((v > 0).mean()) if len(v) else None for v in values.values()], gated)


# seed 000, Figure 3: cosine between columns (keys, values) of a layer


@dataclass(frozen=True)
class Cosines(FigureData):
    keys: dict[int, FloatArray] = field(default_factory=dict)  # layer -> sampled pairs' cosines
    values: dict[int, FloatArray] = field(default_factory=dict)
    pairs: int = 0  # pairs drawn per layer
    all_pairs: int = 0  # pairs there are per layer
    stored_key_mean: list[float | None] = field(default_factory=list)  # layers.key_cosine_mean (exact)
    stored_value_mean: list[float | None] = field(default_factory=list)

    def sample_mean(self, which: str) -> list[float | None]:
        src = self.keys if which == "keys" else self.values
        return [nanmean(src[layer]) if layer in src else None for layer in self.layers]

    def summary(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "all_pairs": self.all_pairs, "seed": COSINE_SEED,
                "key_sample_mean": self.sample_mean("keys"), "value_sample_mean": self.sample_mean("values"),
                "key_cosine_mean": self.stored_key_mean, "value_cosine_mean": self.stored_value_mean,
                "key_quantiles": {str(k): _quantiles(v) for k, v in self.keys.items()},
                "value_quantiles": {str(k): _quantiles(v) for k, v in self.values.items()}}


def cosine_pairs(d_mlp: int, layer: int, *, cap: int = COSINE_PAIRS, seed: int = COSINE_SEED
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pairs (i < j) of distinct columns of a layer: all of them when there are at most ``cap``, else
    ``cap`` pairs drawn uniformly (with replacement) from a generator seeded by (seed, layer)."""
    if d_mlp * (d_mlp - 1) // 2 <= cap:
        i, j = np.triu_indices(d_mlp, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng([seed, layer])
    a = rng.integers(0, d_mlp, size=cap)
    b = rng.integers(0, d_mlp - 1, size=cap)
    b = b + (b >= a)  # uniform over the other columns
    return np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)


_COSINE_SQL = text("""
SELECT k.layer, 1 - (a.key_vector <=> b.key_vector), 1 - (a.value_vector <=> b.value_vector)
FROM unnest(CAST(:layers AS int[]), CAST(:i AS int[]), CAST(:j AS int[])) WITH ORDINALITY AS k(layer, i, j, ord)
JOIN neurons a ON a.run_id = :run AND a.layer = k.layer AND a.neuron = k.i
JOIN neurons b ON b.run_id = :run AND b.layer = k.layer AND b.neuron = k.j
ORDER BY k.ord
""")


def fetch_cosines(session: Session, ref: RunRef, layers: Sequence[int]
                  ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(layer, key cosine, value cosine) of each drawn pair (computed by pgvector in the database, so no
    vector leaves it), and (layer, key_cosine_mean, value_cosine_mean) of the stored layer rows."""
    ls, is_, js = [], [], []
    for layer in layers:
        i, j = cosine_pairs(ref.d_mlp, layer)
        ls += [layer] * len(i)
        is_ += i.tolist()
        js += j.tolist()
    pairs = [tuple(r) for r in session.execute(
        _COSINE_SQL, {"layers": ls, "i": is_, "j": js, "run": ref.run_id}).tuples()]
    stored = [tuple(r) for r in session.execute(
        select(Layer.layer, Layer.key_cosine_mean, Layer.value_cosine_mean)
        .where(Layer.run_id == ref.run_id, Layer.layer.in_(list(layers))).order_by(Layer.layer)
    ).tuples()]
    return pairs, stored


def cosines_data(pairs: Sequence[Sequence[Any]], stored: Sequence[Sequence[Any]], layers: Sequence[int],
                 d_mlp: int) -> Cosines:
    cols = _by_layer(pairs, layers, 2)
    if not any(np.isfinite(c[0]).any() for c in cols.values()):
        return Cosines("cosines", list(layers), "no key or value vectors stored for this run.")
    means = {int(r[0]): (r[1], r[2]) for r in stored}
    n_all = d_mlp * (d_mlp - 1) // 2
    return Cosines("cosines", list(layers), None, {k: finite(c[0]) for k, c in cols.items()},
                   {k: finite(c[1]) for k, c in cols.items()}, min(n_all, COSINE_PAIRS), n_all,
                   [_clean(means.get(layer, (None, None))[0]) for layer in layers],
                   [_clean(means.get(layer, (None, None))[1]) for layer in layers])


def _clean(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


# seed 001: change of the memory coefficient when a token is removed (the stored per-layer figures: the
# median over every trigger of the layer, in columns that keep seed 001's mean_ names)


@dataclass(frozen=True)
class Ablation(FigureData):
    last: list[float | None] = field(default_factory=list)  # median relative change (a' - a) / max(|a|, s)
    first: list[float | None] = field(default_factory=list)
    random: list[float | None] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"mean_ablation_last": self.last, "mean_ablation_first": self.first,
                "mean_ablation_random": self.random}


def fetch_ablation(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, mean_ablation_last, mean_ablation_first, mean_ablation_random) of the layer rows."""
    return [tuple(r) for r in session.execute(
        select(Layer.layer, Layer.mean_ablation_last, Layer.mean_ablation_first, Layer.mean_ablation_random)
        .where(Layer.run_id == ref.run_id, Layer.layer.in_(list(layers))).order_by(Layer.layer)
    ).tuples()]


def _corpus_note(ref: RunRef, encoder: str = ENCODER_ABLATION) -> str:
    """Why a corpus figure has nothing to draw: no corpus pass, an encoder (``encoder`` says what it lacks),
    or columns the run left null."""
    return NO_CORPUS if not ref.has_corpus else encoder if not ref.causal else (
        "not stored for this run (it was made before these figures existed, or none of its triggers "
        "could be measured).")


def ablation_data(rows: Sequence[Sequence[Any]], layers: Sequence[int], ref: RunRef) -> Ablation:
    by = {int(r[0]): [_clean(v) for v in r[1:4]] for r in rows}
    cols = [[by.get(layer, [None] * 3)[k] for layer in layers] for k in range(3)]
    if not any(v is not None for c in cols for v in c):
        return Ablation("ablation", list(layers), _corpus_note(ref))
    return Ablation("ablation", list(layers), None, *cols)


# the suggested label's inputs: paired contrast (last vs a random other token) and context drop


@dataclass(frozen=True)
class Contrast(FigureData):
    contrast: dict[int, FloatArray] = field(default_factory=dict)  # layer -> neurons' label_contrast
    context: dict[int, FloatArray] = field(default_factory=dict)  # layer -> neurons' label_context
    rule: dict[str, Any] | None = None

    def medians(self, which: str) -> list[float | None]:
        src = self.contrast if which == "contrast" else self.context
        return [nanmedian(src[layer]) if layer in src else None for layer in self.layers]

    def summary(self) -> dict[str, Any]:
        return {"median_label_contrast": self.medians("contrast"), "median_label_context": self.medians("context"),
                "neurons": [len(self.contrast.get(layer, [])) for layer in self.layers],
                "label_rule": self.rule}


def fetch_contrast(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, label_contrast, label_context) of every neuron of ``layers``."""
    return [tuple(r) for r in session.execute(
        select(Neuron.layer, Neuron.label_contrast, Neuron.label_context)
        .where(Neuron.run_id == ref.run_id, Neuron.layer.in_(list(layers)))
        .order_by(Neuron.layer, Neuron.neuron)
    ).tuples()]


def contrast_data(rows: Sequence[Sequence[Any]], layers: Sequence[int], ref: RunRef) -> Contrast:
    cols = _by_layer(rows, layers, 2)
    contrast = {k: finite(c[0]) for k, c in cols.items()}
    if not any(len(v) for v in contrast.values()):
        return Contrast("label-contrast", list(layers), _corpus_note(ref))
    return Contrast("label-contrast", list(layers), None, contrast, {k: finite(c[1]) for k, c in cols.items()},
                    ref.label_rule)


# seed 001: agreement of the value's top token with the triggers' next tokens, and its baselines

AGREEMENT_SERIES = ("agreement", "agreement_shuffled", "top_token_frequency", "agreement_top1", "agreement_folded",
                    "agreement_negative")
RANK_SERIES = ("next_token_rank_percentile", "next_token_rank_percentile_shuffled")


@dataclass(frozen=True)
class Agreement(FigureData):
    means: dict[str, list[float | None]] = field(default_factory=dict)  # series -> mean over neurons, by layer
    medians: dict[str, list[float | None]] = field(default_factory=dict)  # rank percentiles: median, by layer
    neurons: list[int] = field(default_factory=list)  # neurons with an agreement, by layer

    def summary(self) -> dict[str, Any]:
        return {"mean": self.means, "median": self.medians, "neurons": self.neurons}


def fetch_agreement(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, *AGREEMENT_SERIES, *RANK_SERIES) of every neuron of ``layers``."""
    return [tuple(r) for r in session.execute(
        select(Neuron.layer, *(getattr(Neuron, c) for c in (*AGREEMENT_SERIES, *RANK_SERIES)))
        .where(Neuron.run_id == ref.run_id, Neuron.layer.in_(list(layers)))
        .order_by(Neuron.layer, Neuron.neuron)
    ).tuples()]


def agreement_data(rows: Sequence[Sequence[Any]], layers: Sequence[int], ref: RunRef) -> Agreement:
    n_a = len(AGREEMENT_SERIES)
    cols = _by_layer(rows, layers, n_a + len(RANK_SERIES))
    if not any(np.isfinite(c[0]).any() for c in cols.values()):
        return Agreement("agreement", list(layers), _corpus_note(ref, ENCODER))
    means = {s: [nanmean(cols[layer][k]) for layer in layers] for k, s in enumerate(AGREEMENT_SERIES)}
    medians = {s: [nanmedian(cols[layer][n_a + k]) for layer in layers] for k, s in enumerate(RANK_SERIES)}
    neurons = [int(np.isfinite(cols[layer][0]).sum()) for layer in layers]
    return Agreement("agreement", list(layers), None, means, medians, neurons)


# seed 001: label shares by layer (suggested, then human)


@dataclass(frozen=True)
class Labels(FigureData):
    counts: list[dict[str, int]] = field(default_factory=list)  # by layer: suggested label -> neurons
    unlabelled: list[int] = field(default_factory=list)  # by layer: neurons without a suggested label
    rule: dict[str, Any] | None = None

    def shares(self) -> list[dict[str, float]]:
        return [{lab: c / sum(cs.values()) for lab, c in cs.items()} if sum(cs.values()) else {} for cs in self.counts]

    def summary(self) -> dict[str, Any]:
        return {"counts": self.counts, "shares": self.shares(), "unlabelled": self.unlabelled,
                "label_rule": self.rule}


def fetch_labels(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, suggested_label or None, neurons) counts."""
    return [tuple(r) for r in session.execute(
        select(Neuron.layer, Neuron.suggested_label, func.count())
        .where(Neuron.run_id == ref.run_id, Neuron.layer.in_(list(layers)))
        .group_by(Neuron.layer, Neuron.suggested_label)
    ).tuples()]


def labels_data(rows: Sequence[Sequence[Any]], layers: Sequence[int], ref: RunRef) -> Labels:
    counts: dict[int, dict[str, int]] = {layer: {} for layer in layers}
    unlabelled = dict.fromkeys(layers, 0)
    for layer, label, n in rows:
        if int(layer) not in counts:
            continue
        if label is None:
            unlabelled[int(layer)] += int(n)
        else:
            counts[int(layer)][str(label)] = int(n)
    if not any(counts.values()):
        return Labels("labels", list(layers), _corpus_note(ref))
    return Labels("labels", list(layers), None, [counts[layer] for layer in layers],
                  [unlabelled[layer] for layer in layers], ref.label_rule)


@dataclass(frozen=True)
class Kappa:
    """Cohen's kappa of the human label against the suggested label (each annotator's current label
    one item), with the observed agreement and the number of items."""

    kappa: float | None
    observed: float | None
    items: int


@dataclass(frozen=True)
class Human(FigureData):
    counts: list[dict[str, int]] = field(default_factory=list)  # by layer: human label -> current annotations
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # human -> suggested (or NO_SUGGESTION) -> n
    overall: Kappa | None = None
    by_layer: list[Kappa] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def k(x: Kappa | None) -> dict[str, Any] | None:
            return None if x is None else {"kappa": x.kappa, "observed": x.observed, "items": x.items}

        return {"counts": self.counts, "confusion": self.confusion, "kappa": k(self.overall),
                "kappa_by_layer": [k(x) for x in self.by_layer]}


def fetch_human(session: Session, ref: RunRef, layers: Sequence[int]) -> list[tuple[Any, ...]]:
    """(layer, neuron, annotator id, human label, suggested label or None) of every current annotation of
    the entry's ``layers`` (the suggested label from the current run)."""
    return [tuple(r) for r in session.execute(
        select(Annotation.layer, Annotation.neuron, Annotation.annotator_id, Annotation.label, Neuron.suggested_label)
        .outerjoin(Neuron, and_(Neuron.run_id == ref.run_id, Neuron.layer == Annotation.layer,
                                Neuron.neuron == Annotation.neuron))
        .where(Annotation.model_id == ref.model_id, Annotation.layer.in_(list(layers)))
        .order_by(Annotation.layer, Annotation.neuron, Annotation.annotator_id)
    ).tuples()]


def _kappa(pairs: Sequence[tuple[str, str]]) -> Kappa:
    kappa, observed = cohen_kappa(pairs)
    return Kappa(kappa, observed, len(pairs))


def human_data(rows: Sequence[Sequence[Any]], layers: Sequence[int]) -> Human:
    counts: dict[int, Counter[str]] = {layer: Counter() for layer in layers}
    pairs: dict[int, list[tuple[str, str]]] = defaultdict(list)
    confusion: dict[str, dict[str, int]] = {}
    for layer, _neuron, _annotator, label, suggested in rows:
        if int(layer) not in counts:
            continue
        counts[int(layer)][str(label)] += 1
        row = confusion.setdefault(str(label), {})
        col = NO_SUGGESTION if suggested is None else str(suggested)
        row[col] = row.get(col, 0) + 1
        if suggested is not None:
            pairs[int(layer)].append((str(label), str(suggested)))
    if not any(counts.values()):
        return Human("human", list(layers), NO_ANNOTATIONS)
    return Human("human", list(layers), None, [dict(counts[layer]) for layer in layers], confusion,
                 _kappa([p for layer in layers for p in pairs[layer]]), [_kappa(pairs[layer]) for layer in layers])
