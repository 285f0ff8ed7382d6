"""The reads behind the model and layer pages: per-layer figures of a catalog's current run, one
layer's neuron statistics (for scatter plots and histograms), and human-label counts by layer.

No torch here (the read side never loads it); numpy computes the histograms that the extraction
did not store (the corpus statistics), with the same binning as the stored ones (``catalog.histograms``:
the axis clipped to the 1st-99th percentiles when outliers would flatten it, the rest counted apart).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog import histograms as hist_rule
from catalog.read.catalog import LAYER_FIELDS, clean, layer_summaries, require_run
from catalog.read.errors import NotFound
from catalog.store.models import NEURON_STATS, Annotation, CatalogModel, ExtractionRun, Layer, Neuron

HISTOGRAM_BINS = hist_rule.BINS  # catalog.extract.weights uses the same


@dataclass(frozen=True)
class ModelFigures:
    """A catalog entry, its current run and the figures of every layer."""

    entry: CatalogModel
    run: ExtractionRun
    layers: list[dict[str, Any]]  # catalog.read.catalog.layer_summaries rows, histograms included
    human_counts: dict[int, dict[str, int]]  # layer -> human label -> annotators' current labels


@dataclass(frozen=True)
class LayerFigures:
    """One layer of a catalog's current run: its figures row and every neuron's statistics."""

    entry: CatalogModel
    run: ExtractionRun
    layer: int
    figures: dict[str, Any]  # the layers row: LAYER_FIELDS (NaN read as None)
    neurons: np.ndarray  # [d_mlp] neuron indices, ascending
    stats: dict[str, np.ndarray]  # statistic -> [d_mlp] float64, NaN where null; only stats with a value
    histograms: dict[str, dict[str, Any]]  # statistic -> catalog.histograms' format
    label_counts: dict[str, int]  # suggested labels in this layer
    human_counts: dict[str, int]  # annotators' current labels in this layer


def human_label_counts(session: Session, entry: CatalogModel, layer: int | None = None) -> dict[int, dict[str, int]]:
    """Annotators' current labels per layer of a catalog entry (one row per annotator and neuron),
    optionally of one layer only."""
    stmt = (select(Annotation.layer, Annotation.label, func.count())
            .where(Annotation.model_id == entry.id, Annotation.layer < entry.n_layers)
            .group_by(Annotation.layer, Annotation.label))
    if layer is not None:
        stmt = stmt.where(Annotation.layer == layer)
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for layer_index, label, n in session.execute(stmt).tuples():
        counts[int(layer_index)][str(label)] = int(n)
    return dict(counts)


def model_figures(session: Session, name: str) -> ModelFigures:
    """Everything the model page draws: the entry, its run, per-layer figures and human labels."""
    entry, run = require_run(session, name)
    return ModelFigures(entry, run, layer_summaries(session, name, histograms=True),
                        human_label_counts(session, entry))


def numpy_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """The stored histograms' format and binning (``catalog.histograms.histogram``); NaN values are left out."""
    return hist_rule.histogram(values, bins)


def _usable(hist: Any) -> bool:
    return (isinstance(hist, dict) and isinstance(hist.get("edges"), list) and isinstance(hist.get("counts"), list)
            and len(hist["edges"]) == len(hist["counts"]) + 1 and len(hist["counts"]) > 0)


def layer_figures(session: Session, name: str, layer: int) -> LayerFigures:
    """One layer's figures row and every neuron's statistics, in one query over ``neurons``."""
    entry, run = require_run(session, name)
    if not 0 <= layer < entry.n_layers:
        raise NotFound(f"catalog {name!r} has no layer {layer} (layers 0-{entry.n_layers - 1})")
    stored = session.scalars(select(Layer).where(Layer.run_id == run.id, Layer.layer == layer)).first()
    if stored is None:
        raise NotFound(f"catalog {name!r} has no figures for layer {layer}")
    rows = session.execute(
        select(Neuron.neuron, *(getattr(Neuron, s) for s in NEURON_STATS), Neuron.suggested_label)
        .where(Neuron.run_id == run.id, Neuron.layer == layer)
        .order_by(Neuron.neuron)
    ).tuples().all()
    columns = list(zip(*rows, strict=True)) if rows else [()] * (len(NEURON_STATS) + 2)
    stats: dict[str, np.ndarray] = {}
    for k, stat in enumerate(NEURON_STATS, start=1):
        col = np.array([np.nan if v is None else v for v in columns[k]], dtype=np.float64)
        if np.isfinite(col).any():
            stats[stat] = col
    # Stored histograms were computed from the weights in float64; the others are computed here.
    saved = stored.histograms or {}
    histograms = {s: hist_rule.normalised(saved[s]) if _usable(saved.get(s)) else numpy_histogram(v)
                  for s, v in stats.items()}
    labels = Counter(str(x) for x in columns[-1] if x is not None)
    human = human_label_counts(session, entry, layer).get(layer, {})
    return LayerFigures(
        entry, run, layer, {f: clean(getattr(stored, f)) for f in LAYER_FIELDS},
        np.array(columns[0], dtype=np.int64), stats, histograms, dict(labels), human,
    )
