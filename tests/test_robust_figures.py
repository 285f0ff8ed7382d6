"""Figures that one outlier must not wreck (issue 15, "Figures and results that mislead").

A tiny seeded GPT-2 (256 neurons per layer, so that a 1st-99th percentile range can leave one neuron
out) is planted with:

- a near-zero trigger: in the last layer, one neuron's bias is shifted so that its weakest document's
  maximum coefficient is GELU(2e-5) ~ 1e-5, in a document where removing the first token raises the
  pre-activation; (a' - a) / |a| for that trigger is in the thousands;
- an outlying key: layer 0's neuron 0 has its key (and bias) multiplied by 30, so its key norm and its
  corpus coefficients sit far above every other neuron's.

Everything is compared with an independent computation: the test's own unbatched forward passes
(BOS + the document, read with its own hooks) and numpy over rows read with plain SQL.
"""

from __future__ import annotations

import math
import random
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import api_server
import httpx
import numpy as np
import pytest
import tiny_models
import torch
from sqlalchemy import text
from sqlalchemy.engine import Engine
from transformers import GPT2Config, GPT2LMHeadModel

from catalog import histograms
from catalog.api.app import create_app
from catalog.extract.ablation import relative_change
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.ui import plots

pytestmark = pytest.mark.usefixtures("one_thread")

TAG = uuid.uuid4().hex[:6]
NAME = f"robust-{TAG}"
NS = "{http://www.w3.org/2000/svg}"
D_MLP = 256
N_DOCS = 40
WINDOW = 24  # longer than every document: one window each, BOS + the document
LAYER = 1  # the planted trigger's layer (the last: nothing downstream of its bias)
T0 = 2e-5  # the planted document's maximum pre-activation after the shift
KEY_SCALE = 30.0
VOCAB = {w: i for i, w in enumerate(tiny_models.SPECIAL + tiny_models.WORDS)}
BOS = VOCAB["<s>"]


def build_model(seed: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=tiny_models.D_MODEL, n_inner=D_MLP, n_layer=2, n_head=2,
                     n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "wte" not in name and "wpe" not in name:
                p.mul_(10.0)
        fc0 = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [d_model, d_mlp], column i = key i
        fc0.weight[:, 0] *= KEY_SCALE
        fc0.bias[0] = KEY_SCALE * 0.5
    return model.eval()


def corpus(seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(tiny_models.WORDS) for _ in range(rng.randint(3, 10))) for _ in range(N_DOCS)]


def forward(model: GPT2LMHeadModel, ids: list[int], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(pre-activation [T, d_mlp], coefficient [T, d_mlp]) of one unbatched sequence, float64."""
    got: dict[str, torch.Tensor] = {}
    mlp = model.transformer.h[layer].mlp
    h1 = mlp.c_fc.register_forward_hook(lambda _m, _a, out: got.__setitem__("pre", out[0].detach().clone()))
    h2 = mlp.c_proj.register_forward_pre_hook(lambda _m, args: got.__setitem__("coef", args[0][0].detach().clone()))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        h1.remove()
        h2.remove()
    return got["pre"].double().numpy(), got["coef"].double().numpy()


@dataclass
class Reference:
    """Per document of the corpus (own forward passes) for one layer: the trigger (the document's maximum
    coefficient), its coefficient and the coefficient with the document's first token removed."""

    pos: np.ndarray  # [docs, d_mlp] trigger position
    a: np.ndarray  # [docs, d_mlp] trigger coefficient
    a_first: np.ndarray  # [docs, d_mlp] NaN where the trigger is the document's first token
    pre: np.ndarray  # [docs, d_mlp] the document's maximum pre-activation
    pre_pos: np.ndarray  # [docs, d_mlp] its position
    pre_first: np.ndarray  # [docs, d_mlp] the pre-activation there with the first token removed


def reference(model: GPT2LMHeadModel, docs: list[list[int]], layer: int) -> Reference:
    pos, a, a_first, pre, pre_pos, pre_first = [], [], [], [], [], []
    for ids in docs:
        p, c = forward(model, [BOS, *ids], layer)
        p, c = p[1:], c[1:]  # BOS is read, never counted
        at = c.argmax(axis=0)  # ties to the earlier position, as the corpus pass
        at_p = p.argmax(axis=0)
        cols = np.arange(c.shape[1])
        pos.append(at)
        a.append(c[at, cols])
        pre.append(p[at_p, cols])
        pre_pos.append(at_p)
        # without the first token, document position k is read at sequence index k (BOS first)
        pf, cf = forward(model, [BOS, *ids[1:]], layer)
        a_first.append(np.where(at >= 1, cf[np.maximum(at, 1), cols], np.nan))
        pre_first.append(np.where(at_p >= 1, pf[np.maximum(at_p, 1), cols], np.nan))
    return Reference(np.array(pos), np.array(a), np.array(a_first), np.array(pre), np.array(pre_pos),
                     np.array(pre_first))


@dataclass
class Planted:
    name: str
    run_id: int
    neuron: int  # the planted neuron of LAYER
    document: int  # its near-zero trigger's document
    ref: Reference  # LAYER, after planting
    key_norms: np.ndarray  # layer 0, from the model's own weights


@pytest.fixture(scope="module")
def planted(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planted]:
    work = tmp_path_factory.mktemp("robust")
    lines = corpus()
    docs = [[VOCAB[w] for w in line.split()] for line in lines]
    model = build_model()
    before = reference(model, docs, LAYER)
    # The neuron to plant: its weakest document (lowest maximum pre-activation) is at least two tokens
    # into the document, removing the first token raises the pre-activation there, and the typical
    # document's maximum is well above it.
    best, best_rise = None, 0.0
    for n in range(D_MLP):
        d = int(np.argmin(before.pre[:, n]))
        rise = before.pre_first[d, n] - before.pre[d, n]
        spread = float(np.median(before.pre[:, n]) - before.pre[d, n])
        if before.pre_pos[d, n] >= 1 and rise > 0.05 and spread > 0.5 and rise > best_rise:
            best, best_rise = (n, d), float(rise)
    assert best is not None, "no neuron to plant on"
    neuron, document = best
    with torch.no_grad():
        model.transformer.h[LAYER].mlp.c_fc.bias[neuron] += T0 - float(before.pre[document, neuron])
    ref = reference(model, docs, LAYER)
    assert int(np.argmin(ref.a[:, neuron])) == document and 0 < ref.a[document, neuron] < 1e-4
    key_norms = np.linalg.norm(model.transformer.h[0].mlp.c_fc.weight.detach().double().numpy(), axis=0)
    model.save_pretrained(work / "model")
    tiny_models.tokenizer().save_pretrained(work / "model")
    path = work / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = default_parameters(top_n=N_DOCS, window=WINDOW)
    try:
        extract(ExtractRequest(model=str(work / "model"), name=NAME, corpus=str(path), params=params), engine=engine)
        with engine.connect() as c:
            run_id = c.execute(text("SELECT current_run_id FROM catalog_models WHERE name = :n"), {"n": NAME}).scalar()
        yield Planted(NAME, int(run_id), neuron, document, ref, key_norms)
    finally:
        api_server.drop_catalog(engine, NAME)


@pytest.fixture(scope="module")
def ui(migrated_db: str) -> Iterator[httpx.Client]:
    with api_server.running_server(create_app()) as base, httpx.Client(base_url=base, timeout=60.0) as client:
        yield client


def triggers(engine: Engine, run_id: int, layer: int) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(text(
            "SELECT neuron, document, coefficient AS a, coefficient_without_last AS last, "
            "coefficient_without_first AS first, coefficient_without_random AS random FROM triggers "
            "WHERE run_id = :r AND layer = :l AND sign = 1 ORDER BY neuron, rank"), {"r": run_id, "l": layer}).mappings()]


def column(engine: Engine, run_id: int, layer: int, stat: str) -> np.ndarray:
    with engine.connect() as c:
        rows = c.execute(text(f"SELECT {stat} FROM neurons WHERE run_id = :r AND layer = :l ORDER BY neuron"),
                         {"r": run_id, "l": layer}).scalars().all()
    return np.array([np.nan if v is None else v for v in rows], dtype=np.float64)


def layer_row(engine: Engine, run_id: int, layer: int) -> dict[str, Any]:
    with engine.connect() as c:
        return dict(c.execute(text("SELECT * FROM layers WHERE run_id = :r AND layer = :l"),
                              {"r": run_id, "l": layer}).mappings().one())


def clip_reference(values: np.ndarray, bins: int = 40) -> dict[str, Any]:
    """The README's rule restated: 40 bins over [min, max] unless the span is over 3x the span of the 1st
    to 99th percentiles; then over those, the values beyond counted apart."""
    v = values[np.isfinite(values)]
    q1, q99 = np.percentile(v, [1, 99])
    clipped = bool(q99 > q1 and v.max() - v.min() > 3 * (q99 - q1))
    lo, hi = (q1, q99) if clipped else (v.min(), v.max())
    inside = v[(v >= lo) & (v <= hi)]
    counts, _ = np.histogram(inside, bins=bins, range=(lo, hi))
    return {"clipped": clipped, "lo": float(lo), "hi": float(hi), "counts": counts.tolist(),
            "below": int((v < lo).sum()), "above": int((v > hi).sum())}


# --- the formula -------------------------------------------------------------------------------------


def test_planted_trigger_is_measured_against_the_neuron_scale(planted: Planted, engine: Engine) -> None:
    ref, n, d = planted.ref, planted.neuron, planted.document
    rows = [t for t in triggers(engine, planted.run_id, LAYER) if t["neuron"] == n]
    assert sorted(t["document"] for t in rows) == list(range(N_DOCS))  # every document is a trigger
    by_doc = {t["document"]: t for t in rows}
    for doc in range(N_DOCS):  # stored coefficients against the test's own forward passes
        assert by_doc[doc]["a"] == pytest.approx(ref.a[doc, n], abs=1e-5), doc
        if math.isnan(ref.a_first[doc, n]):
            assert by_doc[doc]["first"] is None or math.isnan(by_doc[doc]["first"]), doc
        else:
            assert by_doc[doc]["first"] == pytest.approx(ref.a_first[doc, n], abs=1e-5), doc
    a, a1 = ref.a[d, n], ref.a_first[d, n]
    s = float(np.median(ref.a[:, n]))  # the neuron's typical trigger coefficient
    assert 0 < a < 1e-4 and s > 0.1 and a1 > a + 0.01
    old = (a1 - a) / abs(a)  # what (a' - a) / |a| made of this trigger
    assert old > 100, old
    want = (a1 - a) / max(abs(a), s)
    assert 0 < want < 2
    # the neuron's figure: the mean over its triggers of (a' - a) / max(|a|, s), from the reference alone
    changes = [(ref.a_first[k, n] - ref.a[k, n]) / max(abs(ref.a[k, n]), s) for k in range(N_DOCS)
               if not math.isnan(ref.a_first[k, n])]
    stored = column(engine, planted.run_id, LAYER, "ablation_first")[n]
    assert stored == pytest.approx(float(np.mean(changes)), abs=1e-4)
    assert abs(stored) < 2


def test_relative_change_floor_against_numpy() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(1.0, 1.0, size=(7, 9))
    a[0, 0], a[3, 4] = 1e-6, -2e-7
    b = a + rng.normal(0, 0.5, size=a.shape)
    b[2, 2] = np.nan
    s = np.median(a, axis=1)
    s[5] = -0.3  # a neuron that does not fire: no scale, no change
    s = np.where(s > 0, s, np.nan)
    got = relative_change(torch.tensor(a), torch.tensor(b), torch.tensor(s)).numpy()
    want = (b - a) / np.maximum(np.abs(a), s[:, None])  # NaN where s or b is
    assert np.isnan(want[5]).all() and np.isfinite(want[0]).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert np.abs(got[0, 0]) < 5 and np.abs(got[3, 4]) < 5


# --- the per-layer aggregate ----------------------------------------------------------------------------


def test_layer_aggregate_is_the_median_over_triggers(planted: Planted, engine: Engine) -> None:
    rows = triggers(engine, planted.run_id, LAYER)
    scale: dict[int, float] = {}
    for n in {t["neuron"] for t in rows}:
        scale[n] = float(np.median([t["a"] for t in rows if t["neuron"] == n]))
    row = layer_row(engine, planted.run_id, LAYER)
    for kind in ("last", "first", "random"):
        new = [(t[kind] - t["a"]) / max(abs(t["a"]), scale[t["neuron"]]) for t in rows
               if t[kind] is not None and scale[t["neuron"]] > 0]
        assert row[f"mean_ablation_{kind}"] == pytest.approx(float(np.median(new)), rel=1e-6, abs=1e-9), kind
        assert -1.5 < row[f"mean_ablation_{kind}"] < 1.5, kind
    # the planted trigger alone would have moved the old layer mean by over 1 (a sane figure is within +-1)
    old = [(t["first"] - t["a"]) / abs(t["a"]) for t in rows if t["first"] is not None and t["a"] != 0]
    assert float(np.mean(old)) - float(np.median(old)) > 1.0, (np.mean(old), np.median(old))


def test_model_page_ablation_chart_is_not_flattened(planted: Planted, engine: Engine, ui: httpx.Client) -> None:
    r = ui.get(f"/models/{planted.name}")
    assert r.status_code == 200
    m = re.search(r'<figure class="figure" id="fig-ablation">(.*?)</figure>', r.text, re.DOTALL)
    assert m, "no ablation chart"
    svg = ET.fromstring(re.search(r"<svg .*?</svg>", m.group(1), re.DOTALL).group(0))  # type: ignore[union-attr]
    values = {}
    for c in svg.iter(f"{NS}circle"):
        t = c.find(f"{NS}title")
        if c.get("class") == "marker" and t is not None and t.text:
            mm = re.fullmatch(r"(.+), layer (\d+): (\S+)", t.text)
            assert mm
            values[(mm.group(1), int(mm.group(2)))] = float(mm.group(3))
    for layer in (0, 1):
        row = layer_row(engine, planted.run_id, layer)
        for series, field in (("without first token", "mean_ablation_first"),
                              ("without a random token", "mean_ablation_random")):
            assert values[(series, layer)] == pytest.approx(row[field], rel=6e-4, abs=1e-9)
    assert all(abs(v) < 1.5 for v in values.values()), values
    assert "median" in m.group(1) and "max(|a|, s)" in m.group(1).replace("&#39;", "'")


# --- histograms ---------------------------------------------------------------------------------------


def test_histogram_rule_against_numpy() -> None:
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(-0.2, 0.1, 700), [112_059.0], [np.nan]])
    h = histograms.histogram(v)
    want = clip_reference(v)
    assert h["clipped"] and want["clipped"]
    assert h["edges"][0] == pytest.approx(want["lo"]) and h["edges"][-1] == pytest.approx(want["hi"])
    assert h["counts"] == want["counts"] and h["below"] == want["below"] and h["above"] == want["above"]
    assert h["above"] >= 1 and h["max"] == 112_059.0 and h["n"] == 701
    assert sum(h["counts"]) + h["below"] + h["above"] == 701
    # without an outlier: the full range, nothing counted apart
    g = histograms.histogram(v[:700])
    assert not g["clipped"] and g["below"] == g["above"] == 0
    assert g["edges"][0] == v[:700].min() and g["edges"][-1] == pytest.approx(v[:700].max())
    # the SVG draws the outlier as an overflow bar, every value counted once
    root = ET.fromstring(plots.histogram(h, title="t", x_label="ablation_random"))
    rects = [r for r in root.iter(f"{NS}rect") if r.get("data-count")]
    over = {r.get("data-overflow"): int(r.get("data-count", "0")) for r in rects if r.get("data-overflow")}
    assert over.get("above") == want["above"] and over.get("below", 0) == want["below"]
    assert sum(int(r.get("data-count", "0")) for r in rects) == 701
    # an old stored histogram (edges and counts only) reads as unclipped
    old = histograms.normalised({"edges": [0.0, 1.0, 2.0], "counts": [3, 4]})
    assert old["clipped"] is False and old["below"] == old["above"] == 0 and old["n"] == 7


def test_api_layer_histograms_clip_the_outlying_key(planted: Planted, ui: httpx.Client) -> None:
    r = ui.get(f"/api/v1/models/{planted.name}/layers")
    assert r.status_code == 200, r.text
    hist = r.json()["items"][0]["histograms"]["key_norm"]
    want = clip_reference(planted.key_norms)
    assert want["clipped"] and hist["clipped"] is True
    assert hist["edges"][0] == pytest.approx(want["lo"], rel=1e-6)
    assert hist["edges"][-1] == pytest.approx(want["hi"], rel=1e-6)
    assert hist["above"] == want["above"] >= 1 and hist["below"] == want["below"]
    assert hist["counts"] == want["counts"]
    assert hist["max"] == pytest.approx(float(planted.key_norms.max()), rel=1e-6)
    assert sum(hist["counts"]) + hist["below"] + hist["above"] == D_MLP


def test_layer_page_histograms_clip_with_overflow_bars(planted: Planted, engine: Engine, ui: httpx.Client) -> None:
    r = ui.get(f"/models/{planted.name}/layers/0")
    assert r.status_code == 200
    figs = dict(re.findall(r'<figure class="figure" id="fig-([^"]+)">(.*?)</figure>', r.text, re.DOTALL))
    checked = 0
    for stat in ("key_norm", "activation_max", "activation_std", "ablation_first"):
        body = figs[f"hist-{stat}"]
        svg = ET.fromstring(re.search(r"<svg .*?</svg>", body, re.DOTALL).group(0))  # type: ignore[union-attr]
        rects = [x for x in svg.iter(f"{NS}rect") if x.get("data-count")]
        bars = [int(x.get("data-count", "0")) for x in rects if not x.get("data-overflow")]
        over = {x.get("data-overflow"): int(x.get("data-count", "0")) for x in rects if x.get("data-overflow")}
        values = planted.key_norms if stat == "key_norm" else column(engine, planted.run_id, 0, stat)
        want = clip_reference(values)
        assert bars == [c for c in want["counts"] if c], stat
        assert over.get("below", 0) == want["below"] and over.get("above", 0) == want["above"], stat
        caption = re.search(r"<figcaption>(.*?)</figcaption>", body, re.DOTALL).group(1)  # type: ignore[union-attr]
        assert ("clipped to the 1st-99th percentile" in caption) == want["clipped"], stat
        checked += want["clipped"]
    # the outlying key: its norm and its coefficients' maximum are clipped, the outlier in the overflow
    assert checked >= 2
