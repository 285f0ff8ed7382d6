"""The review UI's model and layer pages (seed 000 / seed 001 figures as SVG), over HTTP against a real
uvicorn server and the session's real Postgres, and the plot functions called directly.

Two tiny seeded catalogs are extracted: a GPT-2 with random FFN biases and a corpus, and a Llama
(gated, no bias) from its weights only. Every figure on a page is held against an independent
computation: numpy (polyfit, corrcoef, histogram) over the rows of ``neurons`` / ``layers`` read
here with plain SQL, and label counts from plain SQL (annotations inserted with plain SQL too).
"""

from __future__ import annotations

import math
import re
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import api_server
import httpx
import numpy as np
import pytest
import tiny_models
from sqlalchemy import text
from sqlalchemy.engine import Engine

from catalog.api.app import create_app
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import session_scope
from catalog.store.models import HUMAN_LABELS
from catalog.ui import figure_pages, plots

pytestmark = pytest.mark.usefixtures("one_thread")

TAG = uuid.uuid4().hex[:6]
NS = "{http://www.w3.org/2000/svg}"
EVIL = '<script>x</script> & "quoted" \'single\''
WEIGHT_HISTS = ("key_norm", "value_norm", "alignment", "bias")
CORPUS_STATS = ("activation_mean", "activation_std", "activation_positive_fraction", "activation_max", "agreement",
                "next_token_mean_rank", "ablation_last", "ablation_first", "ablation_random",
                # part 5: firing figures, baselines beside agreement, the label rule's inputs
                "gate_open_fraction", "abs_coefficient_p50", "abs_coefficient_p90", "abs_coefficient_p99",
                "negative_trigger_share", "agreement_shuffled", "agreement_folded", "agreement_top1",
                "agreement_negative", "next_token_rank_percentile", "next_token_rank_percentile_shuffled",
                "top_token_frequency", "label_contrast", "label_context", "label_confidence", "label_triggers")
STATS = ("key_norm", "value_norm", "up_norm", "bias", "alignment", "up_alignment", *CORPUS_STATS)


# --- the catalogs -----------------------------------------------------------------------------


@dataclass
class Cat:
    name: str
    model_id: int
    run_id: int
    n_layers: int
    d_mlp: int
    neurons: dict[int, dict[str, np.ndarray]]  # layer -> column -> values by neuron (NaN for null)
    labels: dict[int, Counter[str]]  # layer -> suggested label counts
    layers: dict[int, dict[str, Any]]  # layers rows


def read_cat(engine: Engine, name: str) -> Cat:
    """The catalog's rows by plain SQL: the reference side of every comparison."""
    with engine.connect() as c:
        model_id, run_id, n_layers, d_mlp = c.execute(text(
            "SELECT id, current_run_id, n_layers, d_mlp FROM catalog_models WHERE name = :n"), {"n": name}).one()
        neurons: dict[int, dict[str, np.ndarray]] = {}
        labels: dict[int, Counter[str]] = {}
        for layer in range(n_layers):
            rows = c.execute(text(f"SELECT neuron, {', '.join(STATS)}, suggested_label FROM neurons "
                                  "WHERE run_id = :r AND layer = :l ORDER BY neuron"),
                             {"r": run_id, "l": layer}).mappings().all()
            assert [r["neuron"] for r in rows] == list(range(d_mlp))
            neurons[layer] = {s: np.array([np.nan if r[s] is None else r[s] for r in rows], dtype=np.float64)
                              for s in STATS}
            labels[layer] = Counter(r["suggested_label"] for r in rows if r["suggested_label"] is not None)
        layers = {r["layer"]: dict(r) for r in c.execute(text("SELECT * FROM layers WHERE run_id = :r"),
                                                          {"r": run_id}).mappings()}
    return Cat(name, model_id, run_id, n_layers, d_mlp, neurons, labels, layers)





@pytest.fixture(scope="module")
def cats(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Cat]]:
    workdir = tmp_path_factory.mktemp("figures")
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(5, 60)) + "\n", encoding="utf-8")
    gpt2_dir = api_server.save_gpt2_with_biases(workdir / "gpt2", seed=0, bias_seed=7)
    llama_dir = tiny_models.save("llama", workdir / "llama", seed=2)
    params = default_parameters(top_n=8, window=24)
    try:
        extract(ExtractRequest(model=str(gpt2_dir), name=f"fig-gpt2-{TAG}", corpus=str(corpus), params=params),
                engine=engine)
        extract(ExtractRequest(model=str(llama_dir), name=f"fig-llama-{TAG}", params=params), engine=engine)
        yield {"gpt2": read_cat(engine, f"fig-gpt2-{TAG}"), "llama": read_cat(engine, f"fig-llama-{TAG}")}
    finally:
        with session_scope(engine) as s:
            ids = "SELECT id FROM catalog_models WHERE name LIKE :p"
            s.execute(text(f"DELETE FROM annotations WHERE model_id IN ({ids})"), {"p": f"fig-%-{TAG}"})
            s.execute(text("DELETE FROM catalog_models WHERE name LIKE :p"), {"p": f"fig-%-{TAG}"})


@pytest.fixture(scope="module")
def ui(migrated_db: str) -> Iterator[httpx.Client]:
    with api_server.running_server(create_app()) as base, httpx.Client(base_url=base, timeout=60.0) as client:
        yield client


# --- reading the pages ------------------------------------------------------------------------------


@dataclass
class Figure:
    svg: ET.Element
    caption: str  # the figcaption's raw HTML


FIGURE = re.compile(r'<figure class="figure" id="fig-([^"]+)">(.*?)</figure>', re.DOTALL)


def page(ui: httpx.Client, path: str, status: int = 200) -> str:
    r = ui.get(path)
    assert r.status_code == status, f"{path} -> {r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("text/html"), r.headers["content-type"]
    return r.text


def figures_of(html: str) -> dict[str, Figure]:
    """Figure id -> its SVG, parsed as XML (so every SVG on the page must be well-formed)."""
    out = {}
    for key, body in FIGURE.findall(html):
        svg = re.search(r"<svg .*?</svg>", body, re.DOTALL)
        assert svg is not None, key
        caption = re.search(r"<figcaption>(.*?)</figcaption>", body, re.DOTALL)
        out[key] = Figure(ET.fromstring(svg.group(0)), caption.group(1) if caption else "")
    return out


def circles(svg: ET.Element, cls: str | None = None) -> list[ET.Element]:
    return [c for c in svg.iter(f"{NS}circle") if cls is None or c.get("class") == cls]


def bar_counts(svg: ET.Element) -> list[int]:
    return [int(r.get("data-count", "0")) for r in svg.iter(f"{NS}rect") if r.get("data-count")]


def marker_values(svg: ET.Element) -> dict[tuple[str, int], float]:
    """(series, layer) -> value, from the line chart markers' tooltips."""
    out = {}
    for c in circles(svg, "marker"):
        title = c.find(f"{NS}title")
        assert title is not None and title.text
        m = re.fullmatch(r"(.+), layer (\d+): (\S+)", title.text)
        assert m, title.text
        out[(m.group(1), int(m.group(2)))] = float(m.group(3))
    return out


def close4(shown: float, ref: float) -> bool:
    """``shown`` is ``ref`` printed with 4 significant digits."""
    return abs(shown - ref) <= 5.1e-4 * abs(ref) + 1e-12


def svg_texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter() if t.tag in (f"{NS}text", f"{NS}title")]


# --- the plot functions ------------------------------------------------------------------------------


def all_plots(title: str, label: str) -> list[str]:
    return [
        plots.scatter([0.1, 0.5, 0.9], [1.0, 2.0, 2.5], title=title, x_label=label, y_label=label, ids=[0, 1, 2]),
        plots.line_chart({label: [0.1, None, 0.3], "other": [0.2, 0.1, 0.0]}, title=title, y_label=label,
                         x_label=label),
        plots.stacked_bars([{"shallow": 2, label: 1}, {"semantic": 3}], title=title, categories=("shallow",),
                           x_label=label),
        plots.histogram({"edges": [0.0, 1.0, 2.0], "counts": [3, 4]}, title=title, x_label=label, y_label=label),
        plots.no_data(title, label),
    ]


def test_every_text_in_a_plot_is_escaped() -> None:
    for svg in all_plots(EVIL, EVIL):
        assert "<script>" not in svg and "&lt;script&gt;" in svg
        root = ET.fromstring(svg)  # well-formed: nothing unescaped broke the markup
        assert root.tag == f"{NS}svg" and root.get("role") == "img" and "plot" in root.get("class", "").split()
        assert EVIL in root.get("aria-label", "")
        # the text reads back exactly as given: escaped once, not dropped or doubly escaped
        assert any(EVIL in t for t in svg_texts(root)), svg[:300]
        assert not any(t.tag == f"{NS}script" for t in root.iter())


def test_scatter_fit_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = -0.7 * x + rng.normal(scale=0.5, size=200)
    xs: list[float | None] = [*x.tolist(), None, math.nan, 1.0]
    ys: list[float | None] = [*y.tolist(), 2.0, 3.0, None]
    root = ET.fromstring(plots.scatter(xs, ys, title="t", x_label="x", y_label="y"))
    assert len(circles(root)) == 200  # None / NaN pairs skipped
    slope, intercept = np.polyfit(x, y, 1)
    assert float(root.get("data-slope", "nan")) == pytest.approx(slope, rel=1e-12)
    assert float(root.get("data-intercept", "nan")) == pytest.approx(intercept, rel=1e-12)
    assert float(root.get("data-r", "nan")) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    caption = " ".join(svg_texts(root))
    m = re.search(r"slope (\S+), intercept (\S+), Pearson r (\S+), n = (\d+)", caption)
    assert m, caption
    assert close4(float(m.group(1).rstrip(",")), slope) and close4(float(m.group(2).rstrip(",")), intercept)
    assert int(m.group(4)) == 200


def test_plots_of_degenerate_data() -> None:
    # nothing to draw
    for svg in (plots.scatter([], [], title="t", x_label="x", y_label="y"),
                plots.scatter([None, math.nan], [1.0, 2.0], title="t", x_label="x", y_label="y"),
                plots.line_chart({"a": [None, None]}, title="t", y_label="y"), plots.line_chart({}, title="t", y_label="y"),
                plots.stacked_bars([{}, {}], title="t"), plots.histogram(None, title="t", x_label="x"),
                plots.histogram({"edges": [0, 1], "counts": [0]}, title="t", x_label="x"),
                plots.histogram({"edges": [0, 1, 2], "counts": [1]}, title="t", x_label="x")):
        root = ET.fromstring(svg)
        assert "no data" in " ".join(svg_texts(root)) and not circles(root) and not bar_counts(root)
    # one point: drawn, no line fitted
    root = ET.fromstring(plots.scatter([1.0], [2.0], title="t", x_label="x", y_label="y"))
    assert len(circles(root)) == 1 and root.get("data-slope") is None
    assert not list(root.iter(f"{NS}line")) or all(ln.get("class") != "fit" for ln in root.iter(f"{NS}line"))
    # all x equal: no line; all y equal: slope 0, r undefined
    root = ET.fromstring(plots.scatter([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], title="t", x_label="x", y_label="y"))
    assert len(circles(root)) == 3 and root.get("data-slope") is None
    root = ET.fromstring(plots.scatter([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], title="t", x_label="x", y_label="y"))
    assert float(root.get("data-slope", "nan")) == 0.0 and root.get("data-r") == ""
    # a None breaks a line into two; equal values and a single layer still draw
    root = ET.fromstring(plots.line_chart({"a": [1.0, 2.0, None, 3.0, 4.0]}, title="t", y_label="y"))
    assert len(list(root.iter(f"{NS}polyline"))) == 2 and len(circles(root, "marker")) == 4
    for series in ({"a": [5.0, 5.0, 5.0]}, {"a": [5.0]}):
        root = ET.fromstring(plots.line_chart(series, title="t", y_label="y"))
        assert len(circles(root, "marker")) == len(series["a"])
        assert all(math.isfinite(float(c.get("cy", "nan"))) for c in circles(root))
    # every value equal in a histogram
    root = ET.fromstring(plots.histogram({"edges": [2.0, 2.0], "counts": [6]}, title="t", x_label="x"))
    assert bar_counts(root) == [6] and all(float(r.get("width", "0")) > 0 for r in root.iter(f"{NS}rect")
                                           if r.get("data-count"))
    # stacked bars: each bar's segments add up to the bar, in the order given
    root = ET.fromstring(plots.stacked_bars([{"semantic": 1, "shallow": 3}, {}], title="t",
                                            categories=("shallow", "semantic")))
    segs = [(r.get("data-layer"), r.get("data-label"), int(r.get("data-count", "-1")))
            for r in root.iter(f"{NS}rect") if r.get("data-label")]
    assert segs == [("0", "shallow", 3), ("0", "semantic", 1)]
    heights = [float(r.get("height", "0")) for r in root.iter(f"{NS}rect") if r.get("data-label")]
    assert heights[0] == pytest.approx(3 * heights[1], rel=0.02)


# --- the layer page ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_page_scatter_fits_match_the_neurons(ui: httpx.Client, cats: dict[str, Cat], layer: int) -> None:
    cat = cats["gpt2"]
    figs = figures_of(page(ui, f"/models/{cat.name}/layers/{layer}"))
    cols = cat.neurons[layer]
    bias = cols["bias"]
    for stat in ("key_norm", "value_norm", "alignment"):
        fig = figs[f"bias-{stat}"]
        assert len(circles(fig.svg)) == cat.d_mlp  # every neuron drawn, nothing else is a circle
        slope, intercept = np.polyfit(cols[stat], bias, 1)
        r = np.corrcoef(cols[stat], bias)[0, 1]
        assert float(fig.svg.get("data-slope", "nan")) == pytest.approx(slope, rel=1e-9)
        assert float(fig.svg.get("data-r", "nan")) == pytest.approx(r, rel=1e-9)
        shown = {k: float(v) for k, v in re.findall(r'<b class="(slope|intercept|r)">([^<]+)</b>', fig.caption)}
        assert close4(shown["slope"], slope) and close4(shown["intercept"], intercept)
        assert abs(shown["r"] - r) <= 5e-4
        assert "seed 000" in fig.caption
    # the stored per-layer figures (seed 000, from the weights) agree with the fit over the stored rows
    row = cat.layers[layer]
    assert row["bias_alignment_slope"] == pytest.approx(np.polyfit(cols["alignment"], bias, 1)[0], rel=1e-6)


def test_layer_page_histograms_count_every_neuron(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["gpt2"]
    figs = figures_of(page(ui, f"/models/{cat.name}/layers/1"))
    cols = cat.neurons[1]
    present = {s for s in STATS if np.isfinite(cols[s]).any()}
    assert {"key_norm", "value_norm", "alignment", "bias", "activation_max", "ablation_last"} <= present
    assert {k[len("hist-"):] for k in figs if k.startswith("hist-")} == present
    for stat in present:
        values = cols[stat][np.isfinite(cols[stat])]
        counts = bar_counts(figs[f"hist-{stat}"].svg)
        assert sum(counts) == len(values), stat
        if stat in WEIGHT_HISTS:
            assert len(values) == cat.d_mlp
        if stat in CORPUS_STATS:  # computed by the page, not stored: the same bins as numpy's
            # (README, "Histograms": clipped to the 1st-99th percentiles when the full span is over 3x theirs)
            lo, hi = float(values.min()), float(values.max())
            q1, q99 = (float(q) for q in np.percentile(values, [1, 99]))
            clipped = q99 > q1 and hi - lo > 3 * (q99 - q1)
            if clipped:
                lo, hi = q1, q99
            elif lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            want, _ = np.histogram(values[(values >= lo) & (values <= hi)], bins=40, range=(lo, hi))
            over = [int(r.get("data-count", "0")) for r in figs[f"hist-{stat}"].svg.iter(f"{NS}rect")
                    if r.get("data-overflow")]
            assert sum(over) == int((values < lo).sum() + (values > hi).sum()), stat
            bins = [c for r, c in zip((r for r in figs[f"hist-{stat}"].svg.iter(f"{NS}rect") if r.get("data-count")),
                                      counts, strict=True) if not r.get("data-overflow")]
            assert bins == [int(c) for c in want if c], stat
            assert ("clipped to the 1st-99th percentile" in figs[f"hist-{stat}"].caption) == clipped, stat


def test_layer_page_labels_links_and_figures(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["gpt2"]
    html = page(ui, f"/models/{cat.name}/layers/0")
    for label in ("shallow", "semantic", "shallow+semantic"):
        m = re.search(rf'data-label="{re.escape(label)}" data-kind="suggested">(\d+)<', html)
        assert m and int(m.group(1)) == cat.labels[0][label], label
    assert sum(cat.labels[0].values()) > 0  # the corpus pass labelled something
    assert f'href="/models/{cat.name}/layers/1"' in html and "/layers/-1" not in html
    assert f'href="/models/{cat.name}/search?layer=0"' in html
    shown = re.search(r'data-field="bias_alignment_slope">([^<]+)<', html)
    assert shown and float(shown.group(1)) == pytest.approx(cat.layers[0]["bias_alignment_slope"], abs=5e-5)
    last = page(ui, f"/models/{cat.name}/layers/{cat.n_layers - 1}")
    assert f'href="/models/{cat.name}/layers/{cat.n_layers - 2}"' in last
    assert f'href="/models/{cat.name}/layers/{cat.n_layers}"' not in last


def test_llama_layer_page_says_there_is_no_bias(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["llama"]
    assert all(np.isnan(cat.neurons[0]["bias"]))
    html = page(ui, f"/models/{cat.name}/layers/0")
    assert "have no bias" in html and 'class="note no-bias"' in html and "no corpus pass" in html
    figs = figures_of(html)
    assert not any(k.startswith("bias-") for k in figs) and "hist-bias" not in figs
    # gated: the up projection's statistics are drawn too; weights only: no corpus statistics
    assert {"hist-key_norm", "hist-value_norm", "hist-alignment", "hist-up_norm", "hist-up_alignment"} <= set(figs)
    assert not any(f"hist-{s}" in figs for s in CORPUS_STATS)
    for key in ("hist-key_norm", "hist-up_norm"):
        assert sum(bar_counts(figs[key].svg)) == cat.d_mlp


# --- the model page ------------------------------------------------------------------------------------


def test_model_page_facts_and_seed_figures(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["gpt2"]
    html = page(ui, f"/models/{cat.name}")
    assert f"<dd>{cat.d_mlp} neurons per layer</dd>" in html and f"#{cat.run_id}" in html
    assert "<dd>gpt2 (gpt2)</dd>" in html and "60 documents" in html
    for layer in range(cat.n_layers):
        assert f'href="/models/{cat.name}/layers/{layer}"' in html
        assert f'href="/models/{cat.name}/search?layer={layer}"' in html
    figs = figures_of(html)
    assert {"slope", "means", "correlations", "cosines", "ablation", "agreement", "suggested", "human"} <= set(figs)
    for key, fig in figs.items():
        assert re.search(r"seed 00[01]", fig.caption), key
    # fitted slope and correlations by layer, against numpy over the neurons read here
    slopes = marker_values(figs["slope"].svg)
    corr = marker_values(figs["correlations"].svg)
    for layer in range(cat.n_layers):
        cols = cat.neurons[layer]
        assert close4(slopes[("slope", layer)], np.polyfit(cols["alignment"], cols["bias"], 1)[0])
        for series, stat in (("bias ~ key norm", "key_norm"), ("bias ~ value norm", "value_norm"),
                             ("bias ~ alignment", "alignment")):
            assert close4(corr[(series, layer)], np.corrcoef(cols["bias"], cols[stat])[0, 1]), (series, layer)
        means = marker_values(figs["means"].svg)
        assert close4(means[("mean alignment", layer)], float(np.mean(cols["alignment"])))
        assert close4(means[("mean bias", layer)], float(np.mean(cols["bias"])))
        ablation = marker_values(figs["ablation"].svg)  # the stored per-layer medians
        assert close4(ablation[("without last token", layer)], cat.layers[layer]["mean_ablation_last"])
        assert close4(marker_values(figs["agreement"].svg)[("mean agreement", layer)],
                      cat.layers[layer]["mean_agreement"])
    # suggested-label shares: one segment per label present, with its count
    segs = {(int(r.get("data-layer", "-1")), r.get("data-label")): int(r.get("data-count", "0"))
            for r in figs["suggested"].svg.iter(f"{NS}rect") if r.get("data-label")}
    assert segs == {(layer, label): n for layer in range(cat.n_layers) for label, n in cat.labels[layer].items()}
    assert "no annotations yet" in " ".join(svg_texts(figs["human"].svg))


def test_llama_model_page_has_no_bias_figures(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["llama"]
    html = page(ui, f"/models/{cat.name}")
    figs = figures_of(html)
    assert "have no bias" in html and "no corpus pass" in html
    assert "slope" not in figs and "correlations" not in figs and "ablation" not in figs
    means = marker_values(figs["means"].svg)
    assert {s for s, _ in means} == {"mean alignment"}
    for layer in range(cat.n_layers):
        assert close4(means[("mean alignment", layer)], float(np.mean(cat.neurons[layer]["alignment"])))
        assert close4(marker_values(figs["cosines"].svg)[("keys", layer)], cat.layers[layer]["key_cosine_mean"])


def test_human_label_shares_follow_the_annotations(ui: httpx.Client, cats: dict[str, Cat], engine: Engine) -> None:
    cat = cats["gpt2"]
    assert set(figure_pages.LABEL_ORDER) == set(HUMAN_LABELS)  # every label has its place in the bars
    # (annotator, layer, neuron, label): annotator b also labels a neuron annotator a labelled
    rows = [("a", 0, 0, "shallow"), ("a", 0, 1, "shallow"), ("a", 0, 2, "shallow"), ("a", 0, 3, "semantic"),
            ("a", 1, 0, "none"), ("a", 1, 5, "shallow+semantic"), ("b", 0, 0, "semantic"), ("b", 1, 0, "none")]
    names = {who: f"fig-{who}-{TAG}" for who in ("a", "b")}
    with engine.begin() as c:
        ids = {who: c.execute(text("INSERT INTO annotators (name, token_sha256) VALUES (:n, NULL) RETURNING id"),
                              {"n": n}).scalar_one() for who, n in names.items()}
        for who, layer, neuron, label in rows:
            c.execute(text(
                "INSERT INTO annotations (model_id, layer, neuron, annotator_id, revision, label, description, "
                "examples, run_id, weights_sha256) VALUES (:m, :l, :n, :a, 1, :label, :d, '[]', :r, NULL)"),
                {"m": cat.model_id, "l": layer, "n": neuron, "a": ids[who], "label": label,
                 "d": f"<b>{label}</b> pattern", "r": cat.run_id})
    try:
        want = Counter((layer, label) for _, layer, _, label in rows)
        figs = figures_of(page(ui, f"/models/{cat.name}"))
        svg = figs["human"].svg
        segs = {(int(r.get("data-layer", "-1")), r.get("data-label")): int(r.get("data-count", "0"))
                for r in svg.iter(f"{NS}rect") if r.get("data-label")}
        assert segs == dict(want)
        tips = [t.text for t in svg.iter(f"{NS}title")]
        assert "layer 0, shallow: 3 of 5 (60.0%)" in tips and "layer 1, none: 2 of 3 (66.7%)" in tips
        html = page(ui, f"/models/{cat.name}/layers/1")
        for label in ("shallow", "semantic", "shallow+semantic", "none"):
            m = re.search(rf'data-label="{re.escape(label)}" data-kind="human">(\d+)<', html)
            assert m and int(m.group(1)) == want[(1, label)], label
        # another catalog's annotations are not this one's
        other = figures_of(page(ui, f"/models/{cats['llama'].name}"))["human"].svg
        assert "no annotations yet" in " ".join(svg_texts(other))
    finally:
        with engine.begin() as c:
            c.execute(text("DELETE FROM annotations WHERE annotator_id = ANY(:ids)"), {"ids": list(ids.values())})
            c.execute(text("DELETE FROM annotators WHERE id = ANY(:ids)"), {"ids": list(ids.values())})
    assert "no annotations yet" in " ".join(svg_texts(figures_of(page(ui, f"/models/{cat.name}"))["human"].svg))


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_model_and_layer_answer_html_404(ui: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["gpt2"]
    html = page(ui, "/models/no-such-model-x", status=404)
    assert "Error 404" in html and "no-such-model-x" in html
    html = page(ui, "/models/%3Cscript%3Ealert(1)%3Cb%3E", status=404)  # the name is shown, as text
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;b&gt;" in html
    for bad in (str(cat.n_layers), "-1", "99999", "abc"):
        html = page(ui, f"/models/{cat.name}/layers/{bad}", status=404)
        assert "Error 404" in html and "layer" in html, bad
    page(ui, "/models/no-such-model-x/layers/0", status=404)
