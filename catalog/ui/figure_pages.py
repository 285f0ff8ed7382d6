"""The model page and the layer page: seed 000 / seed 001 figures drawn as SVG plots, and the findings
report's PNG figures (``catalog.report``: the same data functions, captions and renderers as
``neuron-catalog report``), served from ``/models/{model}/figures/{figure}.png`` and
``/models/{model}/layers/{layer}/figures/{figure}.png`` and cached in memory per run.

Routes stay thin: ``catalog.read.figures`` reads, ``catalog.ui.plots`` draws (escaping every text
it puts in the SVG, which is why its output may be marked safe here), and the templates lay the
plots out, each with a one-sentence caption naming the seed claim it relates to. A read error
(unknown catalog, layer out of range) is answered with an HTML error page and its status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from catalog import histograms as hist_rule
from catalog.annotations import service as annotation_service
from catalog.api.deps import SessionDep
from catalog.read import figures
from catalog.read.catalog import LAYER_FIELDS
from catalog.read.errors import NotFound, ReadError
from catalog.read.schemas import STAT_MEANINGS
from catalog.report import NothingToDraw
from catalog.report import build as report_build
from catalog.report import data as report_data
from catalog.report.cache import FigureCache
from catalog.ui import plots
from catalog.ui.templating import render

router = APIRouter(include_in_schema=False)

# Stacking order of label shares: from shallow to semantic, then "no clear pattern" (every one of
# catalog.vocab.HumanLabel; a label missing here would still be drawn, after these).
LABEL_ORDER = report_data.HUMAN_LABELS
SEED_000 = "seed 000"
SEED_001 = "seed 001"
WEIGHT_STATS = ("key_norm", "value_norm", "up_norm", "bias", "alignment", "up_alignment")
STAT_NAMES = {
    "key_norm": "key norm ‖k_i‖", "value_norm": "value norm ‖v_i‖", "up_norm": "up norm ‖u_i‖",
    "bias": "bias", "alignment": "alignment cos(k_i, v_i)", "up_alignment": "up alignment cos(u_i, v_i)",
    "activation_mean": "mean coefficient", "activation_std": "coefficient std",
    "activation_positive_fraction": "fraction of positions > 0", "activation_max": "max coefficient",
    "agreement": "agreement", "next_token_mean_rank": "next-token mean rank",
    "ablation_last": "change without last token", "ablation_first": "change without first token",
    "ablation_random": "change without a random token",
}
# The layer page's scatter plots: bias against these (seed 000, Figure 1), with what each shows.
SCATTER_CLAIMS = {
    "key_norm": "seed 000, Figure 1: the bias tracks the key's magnitude, keeping each key's threshold comparable",
    "value_norm": "seed 000, Figure 1: most values share one magnitude, with a few outliers",
    "alignment": "seed 000, Figures 1-2: the bias follows the key-value alignment, whose fitted slope the "
                 "model page draws by layer",
}
NO_BIAS = ("This model's feed-forward layers have no bias (as in the LLaMA family), so seed 000's bias figures "
           "(bias against key norm, value norm and alignment) do not apply.")
NO_CORPUS = "This run had no corpus pass (weights only), so it has no seed 001 figures."


@dataclass(frozen=True)
class Plot:
    """One figure of a page: the SVG (escaped inside by catalog.ui.plots) and its caption."""

    key: str
    svg: Markup
    caption: str


def _figure(key: str, svg: str, caption: str) -> Plot:
    return Plot(key, Markup(svg), caption)  # safe: plots.py escaped every text it put inside


def _column(rows: list[dict[str, Any]], field: str) -> list[float | None]:
    return [r.get(field) for r in rows]


def _has(rows: list[dict[str, Any]], field: str) -> bool:
    return any(r.get(field) is not None for r in rows)


def model_url(name: str) -> str:
    return f"/models/{quote(name, safe='')}"


# --- the report's PNG figures -------------------------------------------------------------------------

REPORT_CACHE = FigureCache()


@dataclass(frozen=True)
class ReportFigure:
    """A report figure on a page: the PNG's URL and caption, or the note saying why it is not drawn."""

    key: str
    title: str
    caption: str
    note: str | None
    url: str


def report_figures(session: SessionDep, name: str, layer: int | None = None) -> list[ReportFigure]:
    """The model's report figures (``layer`` None) or one layer's, as the PNG routes serve them."""
    ref = report_data.run_ref(session, name)
    keys = report_build.MODEL_KEYS if layer is None else report_build.LAYER_KEYS
    base = model_url(name) + ("" if layer is None else f"/layers/{layer}")
    out = []
    for key in keys:
        r = REPORT_CACHE.result(session, ref, key, layer)
        out.append(ReportFigure(key, r.title, r.caption, r.note, f"{base}/figures/{quote(key, safe='')}.png"))
    return out


def _png(request: Request, session: SessionDep, model: str, figure: str, layer: int | None) -> Response:
    try:
        ref = report_data.run_ref(session, model)
        png = REPORT_CACHE.png(session, ref, figure, layer)
    except ReadError as exc:
        return error_page(request, exc)
    except NothingToDraw as exc:
        return error_page(request, NotFound(f"figure {figure!r} is not drawn for {model!r}: {exc}"))
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# --- the model page ---------------------------------------------------------------------------------


def seed000_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """By layer: the bias-alignment fit, mean bias and alignment, bias correlations, column cosines."""
    xs = [r["layer"] for r in rows]
    out = []
    if _has(rows, "bias_alignment_slope"):
        out.append(_figure("slope", plots.line_chart(
            {"slope": _column(rows, "bias_alignment_slope"), "intercept": _column(rows, "bias_alignment_intercept")},
            title="Bias against alignment: fitted line by layer", y_label="slope / intercept", xs=xs),
            "Least-squares slope and intercept of each neuron's bias against its alignment cos(k_i, v_i), per "
            "layer (seed 000, Figure 2: the bias follows the alignment, more clearly in later layers)."))
    means = {"mean alignment": _column(rows, "mean_alignment")}
    if _has(rows, "mean_bias"):
        means["mean bias"] = _column(rows, "mean_bias")
    out.append(_figure("means", plots.line_chart(means, title="Mean alignment and mean bias by layer",
                                                 y_label="mean", xs=xs),
                       "Mean key-value alignment (and mean bias) per layer (seed 000, Figures 1-2: alignment "
                       "starts as two clusters, positive and negative, and ends as one slightly negative cluster)."))
    if _has(rows, "corr_bias_key_norm"):
        out.append(_figure("correlations", plots.line_chart(
            {"bias ~ key norm": _column(rows, "corr_bias_key_norm"),
             "bias ~ value norm": _column(rows, "corr_bias_value_norm"),
             "bias ~ alignment": _column(rows, "corr_bias_alignment")},
            title="Correlations of bias by layer", y_label="Pearson r", xs=xs),
            "Pearson correlation of each neuron's bias with its key norm, value norm and alignment, per layer "
            "(seed 000, Figure 1: clear correlations appear in later layers)."))
    out.append(_figure("cosines", plots.line_chart(
        {"keys": _column(rows, "key_cosine_mean"), "values": _column(rows, "value_cosine_mean")},
        title="Mean cosine between a layer's columns", y_label="mean cosine", xs=xs),
        "Mean cosine similarity between distinct keys and between distinct values of each layer (seed 000, "
        "Figure 3: keys tend to share a direction while values are nearly uncorrelated)."))
    return out


def seed001_plots(rows: list[dict[str, Any]], human: dict[int, dict[str, int]]) -> list[Plot]:
    """By layer: ablation changes, agreement, suggested-label and human-label shares."""
    xs = [r["layer"] for r in rows]
    out = []
    if _has(rows, "mean_ablation_last") or _has(rows, "mean_agreement"):
        out.append(_figure("ablation", plots.line_chart(
            {"without last token": _column(rows, "mean_ablation_last"),
             "without first token": _column(rows, "mean_ablation_first"),
             "without a random token": _column(rows, "mean_ablation_random")},
            title="Change of the trigger coefficient when a token is removed", y_label="median relative change",
            xs=xs),
            "Median over every top trigger of a layer of the relative change (a'-a)/max(|a|, s) of its coefficient "
            "when the prefix's last, first or a random token is removed, s the neuron's median trigger coefficient "
            "(a floor, so a near-zero coefficient cannot blow the ratio up; the median, so one outlying trigger "
            "cannot move a layer) (seed 001: removing the last token lowers it most, by 60%+ in lower layers "
            "and about 40% in upper ones, the first or a random token by up to 25%)."))
        out.append(_figure("agreement", plots.line_chart(
            {"mean agreement": _column(rows, "mean_agreement")}, title="Agreement by layer",
            y_label="mean agreement", xs=xs),
            "Mean share of a neuron's triggers whose next token is its value's top token, per layer (seed 001: "
            "the values' top predictions agree with their keys' next tokens more often in upper layers)."))
        out.append(_figure("suggested", plots.stacked_bars(
            [r["label_counts"] for r in rows], title="Suggested labels by layer", categories=LABEL_ORDER, xs=xs),
            "Shares of the suggested labels (from the ablation figures) per layer (seed 001: annotators found "
            "mostly shallow patterns in lower layers and semantic ones in upper layers)."))
    counts = [human.get(layer, {}) for layer in xs]
    svg = (plots.stacked_bars(counts, title="Human labels by layer", categories=LABEL_ORDER, xs=xs)
           if any(counts) else plots.no_data("Human labels by layer", "no annotations yet"))
    out.append(_figure("human", svg,
                       "Shares of annotators' current labels per layer, each annotator's label counted once per "
                       "neuron (seed 001's human classification of trigger patterns as shallow or semantic)."))
    return out


def model_context(data: figures.ModelFigures) -> dict[str, Any]:
    entry, run, rows = data.entry, data.run, data.layers
    notes = [] if _has(rows, "mean_bias") else [NO_BIAS]
    return {
        "title": entry.name, "entry": entry, "run": run, "rows": rows, "model_url": model_url(entry.name),
        "fields": LAYER_FIELDS, "labels": LABEL_ORDER, "human": data.human_counts,
        "seed000": seed000_plots(rows), "notes000": notes,
        "seed001": seed001_plots(rows, data.human_counts), "notes001": [] if run.corpus else [NO_CORPUS],
        "annotations": sum(sum(c.values()) for c in data.human_counts.values()),
    }


# --- the layer page ---------------------------------------------------------------------------------


def scatter_plots(data: figures.LayerFigures) -> list[tuple[Plot, plots.Fit | None]]:
    """Bias against key norm, value norm and alignment, each with its least-squares line."""
    bias = data.stats.get("bias")
    if bias is None:
        return []
    out = []
    ids = data.neurons.tolist()
    for stat, claim in SCATTER_CLAIMS.items():
        x = data.stats[stat].tolist()
        fit = plots.fit_line(x, bias.tolist())
        svg = plots.scatter(x, bias.tolist(), title=f"Layer {data.layer}: bias against {STAT_NAMES[stat]}",
                            x_label=stat, y_label="bias", ids=ids)
        out.append((_figure(f"bias-{stat}", svg,
                            f"Each neuron's bias against its {STAT_NAMES[stat]}, with the least-squares line "
                            f"({claim})."), fit))
    return out


def histogram_plots(data: figures.LayerFigures) -> list[Plot]:
    """One histogram per statistic the layer has (weights first, then the corpus statistics)."""
    out = []
    for stat, hist in data.histograms.items():
        seed = SEED_000 if stat in WEIGHT_STATS else SEED_001
        n = int(sum(hist.get("counts", [])))
        n += int(hist.get("below") or 0) + int(hist.get("above") or 0)
        svg = plots.histogram(hist, title=f"Layer {data.layer}: {STAT_NAMES.get(stat, stat)}", x_label=stat)
        clip = hist_rule.clip_note(hist, plots.num)
        out.append(_figure(f"hist-{stat}", svg,
                           f"Distribution of {stat} over {n} neurons of the layer ({seed}): "
                           f"{STAT_MEANINGS.get(stat, '')}" + (f" {clip}" if clip else "")))
    return out


def layer_context(data: figures.LayerFigures) -> dict[str, Any]:
    entry = data.entry
    return {
        "title": f"{entry.name} layer {data.layer}", "entry": entry, "run": data.run, "layer": data.layer,
        "model_url": model_url(entry.name), "figures": data.figures, "fields": LAYER_FIELDS,
        "n_neurons": len(data.neurons), "scatters": scatter_plots(data), "no_bias": NO_BIAS,
        "notes": [] if data.run.corpus else [NO_CORPUS],
        "histograms": histogram_plots(data), "labels": LABEL_ORDER, "num": plots.num,
        "label_counts": data.label_counts, "human_counts": data.human_counts,
        "prev": data.layer - 1 if data.layer > 0 else None,
        "next": data.layer + 1 if data.layer + 1 < entry.n_layers else None,
    }


# --- routes -----------------------------------------------------------------------------------------


def error_page(request: Request, exc: ReadError) -> HTMLResponse:
    return render(request, "error.html", {"title": f"Error {exc.status}", "status": exc.status,
                                          "message": str(exc)}, status_code=exc.status)


def _layer_index(model: str, layer: str) -> int:
    try:
        return int(layer)
    except ValueError:
        raise NotFound(f"catalog {model!r} has no layer {layer!r} (layers are 0-based integers)") from None


@router.get("/models/{model}", response_class=HTMLResponse)
def model_page(request: Request, model: str, session: SessionDep) -> HTMLResponse:
    """Model facts and the seed 000 / seed 001 figures by layer, with links to each layer page."""
    try:
        context = model_context(figures.model_figures(session, model))
        context.update(agreement=annotation_service.agreement(session, model), model=model,
                       report=report_figures(session, model))
        return render(request, "model.html", context)
    except ReadError as exc:
        return error_page(request, exc)


@router.get("/models/{model}/layers/{layer}", response_class=HTMLResponse)
def layer_page(request: Request, model: str, layer: str, session: SessionDep) -> HTMLResponse:
    """One layer: bias scatter plots with fitted lines, a histogram per statistic, label counts."""
    try:
        data = figures.layer_figures(session, model, _layer_index(model, layer))
        context = layer_context(data)
        context["report"] = report_figures(session, model, data.layer)
        return render(request, "layer.html", context)
    except ReadError as exc:
        return error_page(request, exc)


@router.get("/models/{model}/figures/{figure}.png")
def model_figure_png(request: Request, model: str, figure: str, session: SessionDep) -> Response:
    """A report figure of the model as PNG (404 when unknown or not drawn, e.g. bias figures without bias)."""
    return _png(request, session, model, figure, None)


@router.get("/models/{model}/layers/{layer}/figures/{figure}.png")
def layer_figure_png(request: Request, model: str, layer: str, figure: str, session: SessionDep) -> Response:
    """A report figure of one layer as PNG."""
    try:
        index = _layer_index(model, layer)
    except ReadError as exc:
        return error_page(request, exc)
    return _png(request, session, model, figure, index)
