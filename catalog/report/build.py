"""The report's figures, in order: for each, the query and data function, its caption and renderer.

``model_figures`` gives the figures of a catalog's current run (the report and the UI's model page);
``figure(..., layer)`` one of a layer's (the UI's layer page): the same data functions, captions and
renderers, so the PNG a page shows is the one the report writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from catalog.read.errors import NotFound
from catalog.report import captions
from catalog.report import data as d

Loader = Callable[[Session, d.RunRef, list[int]], d.FigureData]


@dataclass(frozen=True)
class FigureSpec:
    key: str
    seed: str  # "seed 000" | "seed 001": the seed document whose claim the figure tests
    load: Loader
    caption: Callable[[Any, d.RunRef], str]
    on_layer_page: bool = False
    model_layers: Callable[[d.RunRef], list[int]] = field(default=lambda ref: ref.layers)
    uses_annotations: bool = False  # changes with the annotations, not only with the run


def _bias_scatter(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.bias_scatter_data(d.fetch_weight_stats(s, ref, layers), layers)


def _bias_fits(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.bias_fits_data(d.fetch_weight_stats(s, ref, layers), layers)


def _alignment(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.alignment_data(d.fetch_alignment(s, ref, layers), layers, gated=ref.gated)


def _cosines(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    pairs, stored = d.fetch_cosines(s, ref, layers)
    return d.cosines_data(pairs, stored, layers, ref.d_mlp)


def _ablation(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.ablation_data(d.fetch_ablation(s, ref, layers), layers, ref)


def _contrast(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.contrast_data(d.fetch_contrast(s, ref, layers), layers, ref)


def _agreement(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.agreement_data(d.fetch_agreement(s, ref, layers), layers, ref)


def _labels(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.labels_data(d.fetch_labels(s, ref, layers), layers, ref)


def _human(s: Session, ref: d.RunRef, layers: list[int]) -> d.FigureData:
    return d.human_data(d.fetch_human(s, ref, layers), layers)


SPECS: tuple[FigureSpec, ...] = (
    FigureSpec("bias-scatter", "seed 000", _bias_scatter, captions.bias_scatter, on_layer_page=True,
               model_layers=lambda ref: d.spread_layers(ref.n_layers)),
    FigureSpec("bias-fits", "seed 000", _bias_fits, captions.bias_fits),
    FigureSpec("alignment", "seed 000", _alignment, captions.alignment),
    FigureSpec("cosines", "seed 000", _cosines, captions.cosines, on_layer_page=True),
    FigureSpec("ablation", "seed 001", _ablation, captions.ablation),
    FigureSpec("label-contrast", "seed 001", _contrast, captions.contrast, on_layer_page=True),
    FigureSpec("agreement", "seed 001", _agreement, captions.agreement, on_layer_page=True),
    FigureSpec("labels", "seed 001", _labels, captions.labels),
    FigureSpec("human", "seed 001", _human, captions.human, uses_annotations=True),
)
BY_KEY = {s.key: s for s in SPECS}
MODEL_KEYS = tuple(s.key for s in SPECS)
LAYER_KEYS = tuple(s.key for s in SPECS if s.on_layer_page)


@dataclass(frozen=True)
class FigureResult:
    """One figure of a run: its data, title and caption; ``png()`` renders it (matplotlib is imported
    only then)."""

    spec: FigureSpec
    ref: d.RunRef
    data: d.FigureData
    caption: str

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def title(self) -> str:
        return captions.TITLES[self.spec.key]

    @property
    def note(self) -> str | None:
        return self.data.note

    def png(self) -> bytes:
        from catalog.report.figures import render

        return render(self.data, self.ref)

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "seed": self.spec.seed, "caption": self.caption,
                "note": self.note, "layers": self.data.layers, "data": self.data.summary()}


def figure(session: Session, ref: d.RunRef, key: str, layer: int | None = None) -> FigureResult:
    """One figure of the run: of the model (``layer`` None) or of one layer (the layer-page figures)."""
    spec = BY_KEY.get(key)
    if spec is None or (layer is not None and not spec.on_layer_page):
        where = "" if layer is None else " for a layer"
        keys = MODEL_KEYS if layer is None else LAYER_KEYS
        raise NotFound(f"no figure {key!r}{where} (figures: {', '.join(keys)})")
    if layer is not None and not 0 <= layer < ref.n_layers:
        raise NotFound(f"catalog {ref.model!r} has no layer {layer} (layers 0-{ref.n_layers - 1})")
    layers = [layer] if layer is not None else spec.model_layers(ref)
    fig_data = spec.load(session, ref, layers)
    return FigureResult(spec, ref, fig_data, spec.caption(fig_data, ref))


def model_figures(session: Session, ref: d.RunRef, keys: Sequence[str] = MODEL_KEYS) -> list[FigureResult]:
    return [figure(session, ref, k) for k in keys]

