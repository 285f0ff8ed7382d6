"""The findings report (``neuron-catalog report``) and the UI's PNG figures, against real catalogs.

Two tiny seeded catalogs are extracted into the session's Postgres: a GPT-2 with random FFN biases and
a corpus, and a Llama (gated, no bias) from its weights only, under a name with markup in it. The
report command runs as a subprocess; every number of ``figures.json`` is held against numpy over the
rows read here with plain SQL (polyfit, corrcoef, pairwise cosines of the stored vectors, means and
medians by layer, label counts, Cohen's kappa from the confusion matrix), the PNGs are decoded by
Pillow, and the UI (a real uvicorn server) serves the very same PNG bytes.
"""

from __future__ import annotations

import html as html_lib
import io
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import api_server
import httpx
import numpy as np
import pytest
import tiny_models
from cli_runner import cli
from PIL import Image
from sqlalchemy import text
from sqlalchemy.engine import Engine

from catalog.api.app import create_app
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

TAG = uuid.uuid4().hex[:6]
GPT2 = f"rep-gpt2-{TAG}"
# the Llama (weights only, no bias); no '/' in it: the UI's routes take a name as one path segment
EVIL = f'rep-<script>alert(1)<b>&"q"-{TAG}'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NEURON_COLS = ("bias", "key_norm", "value_norm", "alignment", "agreement", "agreement_shuffled",
               "top_token_frequency", "agreement_top1", "agreement_folded", "agreement_negative",
               "next_token_rank_percentile", "next_token_rank_percentile_shuffled", "label_contrast", "label_context")
AGREEMENT_MEANS = ("agreement", "agreement_shuffled", "top_token_frequency", "agreement_top1", "agreement_folded",
                   "agreement_negative")
RANK_MEDIANS = ("next_token_rank_percentile", "next_token_rank_percentile_shuffled")
MODEL_FIGURES = ("bias-scatter", "bias-fits", "alignment", "cosines", "ablation", "label-contrast", "agreement",
                 "labels", "human")


@dataclass
class Cat:
    name: str
    model_id: int
    run_id: int
    n_layers: int
    d_mlp: int
    cols: dict[int, dict[str, np.ndarray]]  # layer -> column -> by neuron (NaN for null)
    labels: dict[int, list[str | None]]  # layer -> suggested label by neuron
    keys: dict[int, np.ndarray]  # layer -> [d_mlp, d_model] key vectors
    values: dict[int, np.ndarray]
    layers: dict[int, dict[str, Any]]  # the layers rows


def _vec(s: str) -> list[float]:
    return [float(x) for x in json.loads(s)]


def read_cat(engine: Engine, name: str) -> Cat:
    """The catalog's rows by plain SQL: the reference side of every comparison."""
    with engine.connect() as c:
        model_id, run_id, n_layers, d_mlp = c.execute(text(
            "SELECT id, current_run_id, n_layers, d_mlp FROM catalog_models WHERE name = :n"), {"n": name}).one()
        cols, labels, keys, values = {}, {}, {}, {}
        for layer in range(n_layers):
            rows = c.execute(text(
                f"SELECT neuron, {', '.join(NEURON_COLS)}, suggested_label, key_vector::text AS k, "
                "value_vector::text AS v FROM neurons WHERE run_id = :r AND layer = :l ORDER BY neuron"),
                {"r": run_id, "l": layer}).mappings().all()
            assert [r["neuron"] for r in rows] == list(range(d_mlp))
            cols[layer] = {s: np.array([np.nan if r[s] is None else r[s] for r in rows], dtype=np.float64)
                           for s in NEURON_COLS}
            labels[layer] = [r["suggested_label"] for r in rows]
            keys[layer] = np.array([_vec(r["k"]) for r in rows], dtype=np.float64)
            values[layer] = np.array([_vec(r["v"]) for r in rows], dtype=np.float64)
        layer_rows = {r["layer"]: dict(r) for r in c.execute(
            text("SELECT * FROM layers WHERE run_id = :r"), {"r": run_id}).mappings()}
    return Cat(name, model_id, run_id, n_layers, d_mlp, cols, labels, keys, values, layer_rows)


@pytest.fixture(scope="module")
def cats(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Cat]]:
    workdir = tmp_path_factory.mktemp("report")
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(11, 60)) + "\n", encoding="utf-8")
    gpt2_dir = api_server.save_gpt2_with_biases(workdir / "gpt2", seed=0, bias_seed=7)
    llama_dir = tiny_models.save("llama", workdir / "llama", seed=2)
    params = default_parameters(top_n=8, window=24)
    try:
        extract(ExtractRequest(model=str(gpt2_dir), name=GPT2, corpus=str(corpus), params=params), engine=engine)
        extract(ExtractRequest(model=str(llama_dir), name=EVIL, params=params), engine=engine)
        yield {"gpt2": read_cat(engine, GPT2), "llama": read_cat(engine, EVIL)}
    finally:
        for name in (GPT2, EVIL):
            api_server.drop_catalog(engine, name)


@dataclass
class Report:
    out: Path
    html: str
    doc: dict[str, Any]
    stdout: str

    def fig(self, key: str) -> dict[str, Any]:
        found = [f for f in self.doc["figures"] if f["key"] == key]
        assert len(found) == 1, key
        return found[0]


def run_report(name: str, out: Path) -> Report:
    r = cli("report", "--model", name, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return Report(out, (out / "index.html").read_text(encoding="utf-8"),
                  json.loads((out / "figures.json").read_text(encoding="utf-8")), r.stdout)


@pytest.fixture(scope="module")
def reports(cats: dict[str, Cat], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    root = tmp_path_factory.mktemp("reports")
    return {"gpt2": run_report(GPT2, root / "gpt2"), "llama": run_report(EVIL, root / "llama")}


def close(a: float | None, b: float, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    return a is not None and abs(a - b) <= rel * abs(b) + abs_


def nan_or(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


# --- the PNGs ---------------------------------------------------------------------------------------


def check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 8000, (path, len(data))
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # the decoder reads every chunk and its CRC
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        width, height = im.size
        assert im.format == "PNG" and width >= 400 and height >= 200, (path, im.size)
        # not one flat colour: something was drawn
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(999)) > 8
    return width, height


def test_every_drawn_figure_is_a_valid_png(reports: dict[str, Report]) -> None:
    rep = reports["gpt2"]
    assert [f["key"] for f in rep.doc["figures"]] == list(MODEL_FIGURES)
    drawn = [f["key"] for f in rep.doc["figures"] if f["note"] is None]
    # a biased GPT-2 with a corpus: everything but the human labels (no annotations) and the figures
    # whose columns this run may leave null
    assert {"bias-scatter", "bias-fits", "alignment", "cosines", "ablation", "agreement", "labels"} <= set(drawn)
    assert rep.fig("human")["note"].startswith("no annotations yet")
    for key in MODEL_FIGURES:
        assert (rep.out / f"{key}.png").exists() == (key in drawn), key
    for key in drawn:
        check_png(rep.out / f"{key}.png")
    assert f"wrote {len(drawn)} figures to" in rep.stdout
    # the bias small multiples: one row of three panels per layer (2 layers here)
    w, h = check_png(rep.out / "bias-scatter.png")
    assert h > w * 0.4


# --- the numbers ------------------------------------------------------------------------------------


def test_seed000_figure_data_matches_numpy(reports: dict[str, Report], cats: dict[str, Cat]) -> None:
    cat, rep = cats["gpt2"], reports["gpt2"]
    fits = rep.fig("bias-fits")["data"]
    scatter = rep.fig("bias-scatter")["data"]["fits"]
    assert rep.fig("bias-scatter")["layers"] == list(range(cat.n_layers))  # 2 layers: all of them
    for layer in range(cat.n_layers):
        c = cat.cols[layer]
        for stat in ("key_norm", "value_norm", "alignment"):
            slope, intercept = np.polyfit(c[stat], c["bias"], 1)
            r = np.corrcoef(c[stat], c["bias"])[0, 1]
            assert close(fits["slope"][stat][layer], slope), (stat, layer)
            assert close(fits["intercept"][stat][layer], intercept, abs_=1e-9), (stat, layer)
            assert close(fits["r"][stat][layer], r), (stat, layer)
            s = scatter[str(layer)][stat]
            assert close(s["slope"], slope) and close(s["r"], r) and s["n"] == cat.d_mlp
        assert close(fits["mean_bias"][layer], float(c["bias"].mean()))
        assert close(fits["mean_alignment"][layer], float(c["alignment"].mean()))
        # the stored per-layer figures (from the weights) agree with the fit over the stored rows
        assert cat.layers[layer]["bias_alignment_slope"] == pytest.approx(fits["slope"]["alignment"][layer], rel=1e-6)
        assert cat.layers[layer]["corr_bias_key_norm"] == pytest.approx(fits["r"]["key_norm"][layer], rel=1e-6)
        al = rep.fig("alignment")["data"]
        assert close(al["mean"][layer], float(c["alignment"].mean()))
        assert close(al["positive_share"][layer], float((c["alignment"] > 0).mean()))
        assert close(al["quantiles"][str(layer)]["q50"], float(np.median(c["alignment"])))
    caption = rep.fig("bias-fits")["caption"]
    assert "seed 000" in caption and f"{fits['slope']['alignment'][0]:.3g}" in caption


def _pair_cosines(m: np.ndarray) -> np.ndarray:
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    i, j = np.triu_indices(len(m), k=1)
    return np.einsum("kd,kd->k", unit[i], unit[j])


def test_column_cosines_match_numpy(reports: dict[str, Report], cats: dict[str, Cat]) -> None:
    for which in ("gpt2", "llama"):
        cat, fig = cats[which], reports[which].fig("cosines")
        assert fig["note"] is None
        data = fig["data"]
        n_pairs = cat.d_mlp * (cat.d_mlp - 1) // 2
        assert data["all_pairs"] == n_pairs and data["pairs"] == n_pairs  # few columns: every pair is drawn
        for layer in range(cat.n_layers):
            for name, m, stored in (("key", cat.keys[layer], "key_cosine_mean"),
                                    ("value", cat.values[layer], "value_cosine_mean")):
                cos = _pair_cosines(m)
                assert close(data[f"{name}_sample_mean"][layer], float(cos.mean()), rel=0, abs_=2e-6), (which, name)
                for q, want in zip((10, 50, 90), np.quantile(cos, [0.1, 0.5, 0.9]), strict=True):
                    got = data[f"{name}_quantiles"][str(layer)][f"q{q}"]
                    assert close(got, float(want), rel=0, abs_=2e-6), (which, name, q)
                # the stored mean over all pairs is the exact one
                assert data[f"{name}_cosine_mean"][layer] == pytest.approx(cat.layers[layer][stored], rel=1e-12)
                assert cat.layers[layer][stored] == pytest.approx(float(cos.mean()), abs=2e-6)


def test_seed001_figure_data_matches_numpy(reports: dict[str, Report], cats: dict[str, Cat]) -> None:
    cat, rep = cats["gpt2"], reports["gpt2"]
    ab = rep.fig("ablation")["data"]
    agree = rep.fig("agreement")["data"]
    labels = rep.fig("labels")["data"]
    contrast = rep.fig("label-contrast")
    for layer in range(cat.n_layers):
        c, row = cat.cols[layer], cat.layers[layer]
        for k in ("last", "first", "random"):
            assert close(ab[f"mean_ablation_{k}"][layer], row[f"mean_ablation_{k}"]), (k, layer)
        for s in AGREEMENT_MEANS:
            v = c[s][np.isfinite(c[s])]
            want = float(v.mean()) if len(v) else None
            got = agree["mean"][s][layer]
            assert (got is None and want is None) or close(got, want), (s, layer, got, want)
        for s in RANK_MEDIANS:
            v = c[s][np.isfinite(c[s])]
            want = float(np.median(v)) if len(v) else None
            got = agree["median"][s][layer]
            assert (got is None and want is None) or close(got, want), (s, layer)
        assert agree["neurons"][layer] == int(np.isfinite(c["agreement"]).sum())
        # the stored layer mean is the mean over neurons
        assert close(agree["mean"]["agreement"][layer], row["mean_agreement"], rel=1e-9)
        counts = Counter(x for x in cat.labels[layer] if x is not None)
        assert labels["counts"][layer] == dict(counts)
        assert labels["unlabelled"][layer] == sum(x is None for x in cat.labels[layer])
        total = sum(counts.values())
        for lab, n in counts.items():
            assert close(labels["shares"][layer][lab], n / total)
        if contrast["note"] is None:
            for s, key in (("label_contrast", "median_label_contrast"), ("label_context", "median_label_context")):
                v = c[s][np.isfinite(c[s])]
                got = contrast["data"][key][layer]
                assert (got is None and len(v) == 0) or close(got, float(np.median(v))), (s, layer)
    assert sum(sum(x.values()) for x in labels["counts"]) > 0  # the corpus pass labelled something
    for key in ("ablation", "agreement", "labels"):
        assert "seed 001" in rep.fig(key)["caption"], key
    last = ab["mean_ablation_last"][0]
    assert f"{-last * 100:.1f}%" in rep.fig("ablation")["caption"]
    assert "median" in rep.fig("ablation")["caption"] and "max(|a|, s)" in rep.fig("ablation")["caption"]


def test_ablation_figure_is_the_median_over_triggers(reports: dict[str, Report], cats: dict[str, Cat],
                                                     engine: Engine) -> None:
    """The drawn per-layer figure against the median over every trigger of (a' - a) / max(|a|, s), s the
    neuron's median trigger coefficient, computed here from the triggers read with plain SQL."""
    cat, ab = cats["gpt2"], reports["gpt2"].fig("ablation")["data"]
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT layer, neuron, coefficient, coefficient_without_last, coefficient_without_first, "
            "coefficient_without_random FROM triggers WHERE run_id = :r AND sign = 1"), {"r": cat.run_id}).all()
    coefs: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        coefs.setdefault((r[0], r[1]), []).append(r[2])
    scale = {k: float(np.median(v)) for k, v in coefs.items()}
    for layer in range(cat.n_layers):
        for k, kind in enumerate(("last", "first", "random")):
            changes = [(r[3 + k] - r[2]) / max(abs(r[2]), scale[(r[0], r[1])]) for r in rows
                       if r[0] == layer and r[3 + k] is not None and not np.isnan(r[3 + k])
                       and scale[(r[0], r[1])] > 0]
            assert close(ab[f"mean_ablation_{kind}"][layer], float(np.median(changes)), rel=1e-6, abs_=1e-9), (kind, layer)


# --- the page ---------------------------------------------------------------------------------------


SECTION = re.compile(r'<(figure|section) class="report-figure" id="fig-([^"]+)" data-figure="[^"]+">(.*?)</\1>',
                     re.DOTALL)


def page_figures(html: str) -> dict[str, tuple[str, str]]:
    """Figure key -> (kind, inner HTML) of the report page."""
    return {key: (kind, body) for kind, key, body in SECTION.findall(html)}


def test_html_lists_every_figure_with_its_caption(reports: dict[str, Report]) -> None:
    rep = reports["gpt2"]
    figs = page_figures(rep.html)
    assert list(figs) == list(MODEL_FIGURES)
    for f in rep.doc["figures"]:
        kind, body = figs[f["key"]]
        assert f'href="#fig-{f["key"]}"' in rep.html  # listed in the contents
        h3 = re.search(r"<h3>(.*?)</h3>", body)
        assert h3 and html_lib.unescape(h3.group(1)) == f["title"]
        if f["note"] is None:
            assert kind == "figure" and f'<img src="{f["key"]}.png"' in body
            cap = re.search(r"<figcaption>(.*?)</figcaption>", body, re.DOTALL)
            assert cap and html_lib.unescape(cap.group(1)) == f["caption"]
            assert re.search(r"seed 00[01]", f["caption"]), f["key"]
        else:
            assert kind == "section" and "<img" not in body
            note = re.search(r'<p class="note">(.*?)</p>', body, re.DOTALL)
            assert note and html_lib.unescape(note.group(1)) == f["note"]
    assert f"<h1>Findings: {GPT2}</h1>" in rep.html and "60 documents" in rep.html


def test_html_escapes_the_name_and_says_no_bias(reports: dict[str, Report], cats: dict[str, Cat]) -> None:
    rep = reports["llama"]
    assert all(np.isnan(cats["llama"].cols[0]["bias"]))
    assert "<script" not in rep.html  # the page has no script at all, and the name's markup is text
    assert html_lib.escape("<script>alert(1)<b>", quote=False) in rep.html
    h1 = re.search(r"<h1>Findings: (.*?)</h1>", rep.html)
    assert h1 and "<" not in h1.group(1) and '"' not in h1.group(1) and html_lib.unescape(h1.group(1)) == EVIL
    figs = page_figures(rep.html)
    for key in ("bias-scatter", "bias-fits"):
        kind, body = figs[key]
        assert kind == "section" and "no bias" in body and "<img" not in body
        assert not (rep.out / f"{key}.png").exists()
    for key in ("ablation", "agreement", "labels", "label-contrast"):
        assert "no corpus pass" in figs[key][1], key
    # weights-only figures still drawn: alignment (gate rows) and column cosines
    for key in ("alignment", "cosines"):
        assert figs[key][0] == "figure"
        check_png(rep.out / f"{key}.png")
    assert "cos(g_i, v_i)" in rep.fig("alignment")["caption"]
    assert "no bias" in rep.stdout


def test_cli_errors_are_one_line(cats: dict[str, Cat], tmp_path: Path) -> None:
    r = cli("report", "--model", f"no-such-model-{TAG}", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    target = tmp_path / "a-file"
    target.write_text("x")
    r = cli("report", "--model", GPT2, "--out", str(target))
    assert r.returncode == 1 and "not a directory" in r.stderr and target.read_text() == "x"


# --- human labels -----------------------------------------------------------------------------------


def cohen(pairs: list[tuple[str, str]]) -> float:
    cats_ = sorted({x for p in pairs for x in p})
    idx = {c: k for k, c in enumerate(cats_)}
    m = np.zeros((len(cats_), len(cats_)))
    for a, b in pairs:
        m[idx[a], idx[b]] += 1
    n = m.sum()
    po = np.trace(m) / n
    pe = float(m.sum(axis=1) @ m.sum(axis=0)) / n ** 2
    return float((po - pe) / (1 - pe))


@pytest.fixture
def annotated(cats: dict[str, Cat], engine: Engine) -> Iterator[list[tuple[str, int, int, str]]]:
    cat = cats["gpt2"]
    labelled = [(layer, n, lab) for layer in range(cat.n_layers) for n, lab in enumerate(cat.labels[layer])
                if lab is not None][:6]
    assert len(labelled) >= 4
    human = ["shallow", "semantic", "none", "shallow+semantic", "shallow", "semantic"]
    rows = [("a", layer, n, human[k]) for k, (layer, n, _) in enumerate(labelled)]
    rows += [("b", layer, n, lab) for layer, n, lab in labelled[:3]]  # b agrees with the suggestion
    names = {who: f"rep-{who}-{TAG}" for who in ("a", "b")}
    with engine.begin() as c:
        ids = {who: c.execute(text("INSERT INTO annotators (name, token_sha256) VALUES (:n, NULL) RETURNING id"),
                              {"n": n}).scalar_one() for who, n in names.items()}
        for who, layer, neuron, label in rows:
            c.execute(text(
                "INSERT INTO annotations (model_id, layer, neuron, annotator_id, revision, label, description, "
                "examples, run_id, weights_sha256) VALUES (:m, :l, :n, :a, 1, :label, '', '[]', :r, NULL)"),
                {"m": cat.model_id, "l": layer, "n": neuron, "a": ids[who], "label": label, "r": cat.run_id})
    try:
        yield rows
    finally:
        with engine.begin() as c:
            c.execute(text("DELETE FROM annotations WHERE annotator_id = ANY(:ids)"), {"ids": list(ids.values())})
            c.execute(text("DELETE FROM annotators WHERE id = ANY(:ids)"), {"ids": list(ids.values())})


def test_human_labels_and_their_kappa(cats: dict[str, Cat], annotated: list[tuple[str, int, int, str]],
                                      tmp_path: Path) -> None:
    cat = cats["gpt2"]
    rep = run_report(GPT2, tmp_path / "annotated")
    fig = rep.fig("human")
    assert fig["note"] is None
    check_png(rep.out / "human.png")
    data = fig["data"]
    for layer in range(cat.n_layers):
        assert data["counts"][layer] == dict(Counter(lab for _, lay, _, lab in annotated if lay == layer))
    pairs = [(lab, str(cat.labels[layer][n])) for _, layer, n, lab in annotated]
    want_confusion: dict[str, dict[str, int]] = {}
    for h, s in pairs:
        want_confusion.setdefault(h, {}).setdefault(s, 0)
        want_confusion[h][s] += 1
    assert data["confusion"] == want_confusion
    assert data["kappa"]["items"] == len(pairs)
    assert close(data["kappa"]["kappa"], cohen(pairs))
    assert close(data["kappa"]["observed"], sum(h == s for h, s in pairs) / len(pairs))
    for layer in range(cat.n_layers):
        lp = [(lab, str(cat.labels[lay][n])) for _, lay, n, lab in annotated if lay == layer]
        got = data["kappa_by_layer"][layer]
        assert got["items"] == len(lp)
        if len(lp) >= 2 and len({x for p in lp for x in p}) > 1:
            assert close(got["kappa"], cohen(lp)), layer
    assert f"{data['kappa']['kappa']:.3g}" in fig["caption"] and "Cohen's kappa" in fig["caption"]


# --- the UI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(migrated_db: str) -> Iterator[httpx.Client]:
    with api_server.running_server(create_app()) as base, httpx.Client(base_url=base, timeout=120.0) as client:
        yield client


def test_ui_serves_the_report_pngs(ui: httpx.Client, reports: dict[str, Report], cats: dict[str, Cat]) -> None:
    rep = reports["gpt2"]
    base = f"/models/{quote(GPT2, safe='')}"
    page = ui.get(base)
    assert page.status_code == 200
    for f in rep.doc["figures"]:
        if f["note"] is not None:
            assert f'id="png-{f["key"]}"' in page.text and f["note"] in html_lib.unescape(page.text)
            continue
        url = f"{base}/figures/{f['key']}.png"
        assert f'<img src="{url}"' in page.text
        body = page.text.split(f'id="png-{f["key"]}"', 1)[1].split("</figure>", 1)[0]
        cap = re.search(r"<figcaption>(.*?)</figcaption>", body, re.DOTALL)
        assert cap and html_lib.unescape(cap.group(1)) == f["caption"], f["key"]
        r = ui.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", f["key"]
        if f["key"] != "human":
            assert r.content == (rep.out / f"{f['key']}.png").read_bytes(), f["key"]  # the very same figure
    csp = page.headers["content-security-policy"]
    assert "img-src 'self' data:" in csp
    # a layer page: its own figures, rendered by the same functions for that layer
    layer_page = ui.get(f"{base}/layers/1")
    assert layer_page.status_code == 200
    for key in ("bias-scatter", "cosines", "agreement"):
        url = f"{base}/layers/1/figures/{key}.png"
        assert f'<img src="{url}"' in layer_page.text, key
        r = ui.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content[:8] == PNG_MAGIC and len(r.content) > 8000
    assert "layer 1: key norm slope" in layer_page.text
    # unknown figures, layers, catalogs, and figures that are not drawn: 404 pages
    for path in (f"{base}/figures/nope.png", f"{base}/layers/9/figures/cosines.png",
                 f"{base}/layers/x/figures/cosines.png", f"{base}/layers/0/figures/labels.png",
                 "/models/no-such-model-q/figures/cosines.png",
                 f"/models/{quote(EVIL, safe='')}/figures/bias-fits.png"):
        r = ui.get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), path
    evil = ui.get(f"/models/{quote(EVIL, safe='')}")
    assert evil.status_code == 200 and "<script>alert(1)" not in evil.text and "no bias" in evil.text
    r = ui.get(f"/models/{quote(EVIL, safe='')}/figures/cosines.png")
    assert r.status_code == 200 and r.content == (reports["llama"].out / "cosines.png").read_bytes()


def test_ui_human_figure_follows_new_annotations(ui: httpx.Client, cats: dict[str, Cat],
                                                 annotated: list[tuple[str, int, int, str]]) -> None:
    base = f"/models/{quote(GPT2, safe='')}"
    page = ui.get(base)
    assert page.status_code == 200
    assert f'<img src="{base}/figures/human.png"' in page.text  # not the cached "no annotations yet"
    r = ui.get(f"{base}/figures/human.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# --- many layers, rendered from synthetic rows (no database) ------------------------------------------


def test_many_layer_figures_render_and_state_the_depth_trend(tmp_path: Path) -> None:
    from catalog.report import captions, figures
    from catalog.report import data as d

    rng = np.random.default_rng(5)
    n_layers, d_mlp = 30, 120
    ref = d.RunRef(model="synthetic <m>", model_id=0, run_id=0, n_layers=n_layers, d_mlp=d_mlp, family="gpt2",
                   gated=False, causal=True, has_corpus=True, label_rule={"contrast_threshold": 0.1, "seed": 0},
                   corpus={"source": "x"}, parameters={})
    layers = list(range(n_layers))
    weights = [(layer, float(rng.normal()), float(rng.uniform(1, 2)), float(rng.uniform(0.5, 1)),
                float(rng.uniform(-1, 1))) for layer in layers for _ in range(d_mlp)]
    agreement = [(layer, *(float(x) for x in rng.uniform(0, 0.05, 6)), *(float(x) for x in rng.uniform(0, 1, 2)))
                 for layer in layers for _ in range(d_mlp)]
    agreement = [(*r[:6], None, *r[7:]) for r in agreement]  # no negative triggers (not gated)
    labels = [(layer, lab, int(rng.integers(0, 50))) for layer in layers for lab in (*d.SUGGESTED_LABELS, None)]
    pairs = [(layer, float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))) for layer in layers for _ in range(300)]
    stored = [(layer, 0.1, 0.0) for layer in layers]
    ablation = [(layer, -0.9 + 0.02 * layer, -0.2, -0.1) for layer in layers]
    contrast = [(layer, float(rng.normal(0.5 - layer / 60)), float(rng.normal())) for layer in layers for _ in range(d_mlp)]
    human = [(layer, n, 1, str(rng.choice(d.HUMAN_LABELS)), str(rng.choice(d.SUGGESTED_LABELS)))
             for layer in layers for n in range(3)]
    spread = d.spread_layers(n_layers)
    assert spread[0] == 0 and spread[-1] == n_layers - 1 and len(spread) == d.SCATTER_LAYERS
    built = [
        (d.bias_scatter_data(weights, spread), captions.bias_scatter),
        (d.bias_fits_data(weights, layers), captions.bias_fits),
        (d.alignment_data([(r[0], r[4]) for r in weights], layers, gated=False), captions.alignment),
        (d.cosines_data(pairs, stored, layers, d_mlp), captions.cosines),
        (d.ablation_data(ablation, layers, ref), captions.ablation),
        (d.contrast_data(contrast, layers, ref), captions.contrast),
        (d.agreement_data(agreement, layers, ref), captions.agreement),
        (d.labels_data(labels, layers, ref), captions.labels),
        (d.human_data(human, layers), captions.human),
    ]
    for fig, caption in built:
        assert fig.note is None, fig.key
        path = tmp_path / f"{fig.key}.png"
        path.write_bytes(figures.render(fig, ref))
        check_png(path)
        assert re.search(r"seed 00[01]", caption(fig, ref)), fig.key
    # the depth trend is stated: first third of the layers against the last third
    drops = [0.9 - 0.02 * layer for layer in layers]
    cap = captions.ablation(built[4][0], ref)  # type: ignore[arg-type]
    assert f"first third of the layers {np.mean(drops[:10]) * 100:.1f}%, last third {np.mean(drops[-10:]) * 100:.1f}%" in cap
    assert "contrast_threshold = 0.1" in captions.contrast(built[5][0], ref)  # type: ignore[arg-type]
    assert "negative triggers against" not in captions.agreement(built[6][0], ref)  # type: ignore[arg-type]


def test_figures_with_nothing_to_draw_say_why() -> None:
    from catalog.report import NothingToDraw, figures
    from catalog.report import data as d

    ref = d.RunRef(model="m", model_id=0, run_id=0, n_layers=2, d_mlp=3, family="llama", gated=True, causal=True,
                   has_corpus=False, label_rule=None, corpus=None, parameters={})
    no_bias = [(layer, None, 1.0, 1.0, 0.1) for layer in range(2) for _ in range(3)]
    assert d.bias_scatter_data(no_bias, [0, 1]).note == d.NO_BIAS
    assert d.bias_fits_data(no_bias, [0, 1]).note == d.NO_BIAS
    assert d.NO_BIAS.startswith("no bias")
    for fig in (d.ablation_data([(0, None, None, None)], [0, 1], ref), d.agreement_data([], [0, 1], ref),
                d.labels_data([(0, None, 3)], [0, 1], ref), d.contrast_data([], [0, 1], ref)):
        assert fig.note == d.NO_CORPUS, fig.key
        with pytest.raises(NothingToDraw):
            figures.render(fig, ref)
    encoder = d.RunRef(**{**ref.__dict__, "causal": False, "has_corpus": True})
    assert d.agreement_data([(0, *([None] * 8))], [0], encoder).note == d.ENCODER
    assert d.human_data([], [0, 1]).note == d.NO_ANNOTATIONS
    # a constant x has no fitted line; a constant y has slope 0 and no r
    assert d.least_squares(np.ones(4), np.arange(4.0)) is None
    flat = d.least_squares(np.arange(4.0), np.ones(4))
    assert flat is not None and flat.slope == 0.0 and flat.r is None
