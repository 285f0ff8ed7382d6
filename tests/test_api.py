"""The search API (part 3) over HTTP, against a real uvicorn server and the session's real Postgres.

Three tiny seeded catalogs are extracted here: a GPT-2 (random biases), a Llama (gated, no bias)
and a GPT-2 whose vocabulary has both 'cat' and 'Ġcat' (decoded ' cat'), with 3 layers. Every
answer is held against an independent reference: the model's own tensors (norms, alignments,
vectors, value projections, token rankings, cosines, forward-pass coefficients), Python over the
rows of ``neurons`` / ``triggers`` / ``prefixes`` read here with plain SQL, and this file's own
tokenisation of the corpus (trigger and next tokens). Nothing here calls ``catalog.read``.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import api_server
import httpx
import numpy as np
import pytest
import tiny_models
import torch
from sqlalchemy import delete, text
from sqlalchemy.engine import Engine
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from catalog.corpus import Document
from catalog.extract.corpus_pass import corpus_pass
from catalog.extract.windows import tokenise
from catalog.read import vectors
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import session_scope
from catalog.store.models import LABELS, NEURON_STATS, CatalogModel

TOP_N, WINDOW = 10, 32
VALUE_TOP, VALUE_BOTTOM = 30, 10
PARAMS: dict[str, Any] = {"top_n": TOP_N, "window": WINDOW}
TAG = uuid.uuid4().hex[:6]
# Lines planted among the random sentences so that pattern search has known answers.
PLANTED = [
    "the red house is big", "a red house and a red cat", "red house", "the cat sat in the red house .",
    "red cat sat on the mat", "the red cat ran fast", "red tree and blue house", "a small red bird sang",
    "the big red house of the moon", "blue house , red cat", "house red", "red , house",
]
SORTS = [None, "layer", "-layer", *(s for stat in NEURON_STATS for s in (stat, "-" + stat))]
Key = tuple[int, int]

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the catalogs and the reference ---------------------------------------------------------


@dataclass
class Cat:
    """One extracted catalog and everything the tests compare it with."""

    label: str  # gpt2 | llama | spaced
    name: str
    directory: Path
    run_id: int
    model: Any
    tokenizer: Any
    lines: list[str]
    n_layers: int
    gated: bool
    keys: np.ndarray  # [L, d_mlp, d_model] float64, from the weights
    values: np.ndarray  # [L, d_mlp, d_model]
    ups: np.ndarray | None
    bias: np.ndarray | None  # [L, d_mlp]
    E: np.ndarray  # [V, d_model] output embeddings as stored
    doc_tokens: list[list[int]]  # this file's tokenisation of each corpus line (document index = line)
    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # neurons rows (SQL)
    triggers: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)  # positive, by rank (SQL)
    negative: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def d_mlp(self) -> int:
        return int(self.keys.shape[1])

    @property
    def all_keys(self) -> list[Key]:
        return [(l, n) for l in range(self.n_layers) for n in range(self.d_mlp)]

    def logits(self, layer: int) -> np.ndarray:
        """v_i . E^T for every neuron of a layer: [d_mlp, V]."""
        return self.values[layer] @ self.E.T

    def decoded(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def word_ids(self, word: str) -> list[int]:
        """Token ids whose decoded text is the word or the space-marked word (this file's reading)."""
        return [i for i in range(self.E.shape[0]) if self.decoded(i) in (word, " " + word)]


def value_projections(model: Any, gated: bool) -> list[nn.Module]:
    if gated:
        return [b.mlp.down_proj for b in model.model.layers]
    return [b.mlp.c_proj for b in model.transformer.h]


def weights(model: Any, gated: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    def f(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    if gated:
        layers = model.model.layers
        keys = np.stack([f(b.mlp.gate_proj.weight) for b in layers])  # rows
        ups = np.stack([f(b.mlp.up_proj.weight) for b in layers])
        values = np.stack([f(b.mlp.down_proj.weight).T for b in layers])  # columns of down_proj
        return keys, values, ups, None
    layers = model.transformer.h
    keys = np.stack([f(b.mlp.c_fc.weight).T for b in layers])  # Conv1D [d_model, d_mlp]: columns
    values = np.stack([f(b.mlp.c_proj.weight) for b in layers])  # Conv1D [d_mlp, d_model]: rows
    bias = np.stack([f(b.mlp.c_fc.bias) for b in layers])
    return keys, values, None, bias


def read_rows(engine: Engine, cat: Cat) -> None:
    """The run's neurons and triggers with plain SQL (the reference's view of the stored figures)."""
    cols = ", ".join(NEURON_STATS)
    with engine.connect() as c:
        for row in c.execute(text(f"SELECT layer, neuron, {cols}, suggested_label FROM neurons WHERE run_id = :r"),
                             {"r": cat.run_id}).mappings():
            cat.rows[(row["layer"], row["neuron"])] = dict(row)
            # NaN would be shown as null but sorted above every number: the reference assumes none is stored
            assert not any(isinstance(row[s], float) and math.isnan(row[s]) for s in NEURON_STATS), dict(row)
        for row in c.execute(text(
            "SELECT t.layer, t.neuron, t.sign, t.rank, t.document, t.position, t.coefficient, p.text, "
            "p.token_id, p.next_token_id FROM triggers t JOIN prefixes p ON p.run_id = t.run_id "
            "AND p.document = t.document AND p.position = t.position WHERE t.run_id = :r "
            "ORDER BY t.layer, t.neuron, t.sign DESC, t.rank"), {"r": cat.run_id}).mappings():
            into = cat.triggers if row["sign"] == 1 else cat.negative
            into.setdefault((row["layer"], row["neuron"]), []).append(dict(row))


def coefficients(model: Any, gated: bool, ids: list[int]) -> np.ndarray:
    """Memory coefficients [pos, layer, d_mlp] of one unbatched forward pass (this file's own hooks)."""
    got: list[np.ndarray] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0][0].detach().double().numpy().copy())

    handles = [p.register_forward_pre_hook(hook) for p in value_projections(model, gated)]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return np.stack(got, axis=1)


def load_cat(engine: Engine, label: str, name: str, directory: Path, run_id: int, lines: list[str],
             gated: bool) -> Cat:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    keys, values, ups, bias = weights(model, gated)
    E = model.get_output_embeddings().weight.detach().double().numpy()
    doc_tokens = [tok(line, add_special_tokens=False)["input_ids"] for line in lines]
    cat = Cat(label, name, directory, run_id, model, tok, lines, keys.shape[0], gated, keys, values, ups, bias, E,
              doc_tokens)
    read_rows(engine, cat)
    return cat


def write_corpus(path: Path, lines: list[str]) -> Path:
    assert all(line.strip() for line in lines)  # document index == line number
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path





@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def cats(engine: Engine, workdir: Path) -> Iterator[dict[str, Cat]]:
    lines = api_server.random_lines(11, 300, planted=PLANTED)
    corpus = write_corpus(workdir / "corpus.txt", lines)

    gpt2_dir = api_server.save_gpt2_with_biases(workdir / "gpt2", seed=0, bias_seed=1)
    llama_dir = tiny_models.save("llama", workdir / "llama", seed=2)
    spaced_dir = api_server.save_spaced_gpt2(workdir / "spaced", seed=3, n_layers=3)

    out: dict[str, Cat] = {}
    names = []
    try:
        for label, directory, gated in (("gpt2", gpt2_dir, False), ("llama", llama_dir, True),
                                        ("spaced", spaced_dir, False)):
            name = f"api-{label}-{TAG}"
            names.append(name)
            summary = extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus),
                                             params=default_parameters(**PARAMS)), engine=engine)
            out[label] = load_cat(engine, label, name, directory, summary.run_id, lines, gated)
        yield out
    finally:
        with session_scope(engine) as s:
            s.execute(delete(CatalogModel).where(CatalogModel.name.like(f"api-%-{TAG}")))








# --- helpers ----------------------------------------------------------------------------------


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text}"
    return r.json()


def pages(api: httpx.Client, model: str, params: dict[str, Any], limit: int) -> tuple[list[dict[str, Any]], int]:
    """Every page of a search, following next_cursor; (items in order, number of pages)."""
    items: list[dict[str, Any]] = []
    cursor = None
    n = 0
    while True:
        p = {k: v for k, v in params.items() if v is not None} | {"limit": limit}
        if cursor is not None:
            p["cursor"] = cursor
        body = ok(api.get(f"/models/{model}/neurons", params=p))
        n += 1
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items, n
        assert len(body["items"]) == limit, "a page before the last one is short"
        assert n < 500


def keys_of(items: list[dict[str, Any]]) -> list[Key]:
    return [(it["layer"], it["neuron"]) for it in items]


def expected_order(cat: Cat, keys: set[Key], sort: str | None) -> list[Key]:
    """(sort value, layer, neuron) ascending, or all three descending; nulls last by (layer, neuron)."""
    if sort in (None, "layer"):
        return sorted(keys)
    if sort == "-layer":
        return sorted(keys, reverse=True)
    desc = sort.startswith("-")
    stat = sort.lstrip("-")
    valued = sorted(((cat.rows[k][stat], k) for k in keys if cat.rows[k][stat] is not None), reverse=desc)
    return [k for _, k in valued] + sorted(k for k in keys if cat.rows[k][stat] is None)


def words(s: str) -> list[str]:
    """The words of a prefix as Postgres' 'simple' configuration reads them (punctuation takes no position)."""
    return re.findall(r"[^\W_]+", s.lower())


def adjacent(ws: list[str], *phrase: str) -> bool:
    return any(tuple(ws[i : i + len(phrase)]) == phrase for i in range(len(ws) - len(phrase) + 1))


# q -> the per-prefix predicate (a neuron matches when one of its positive prefixes satisfies it)
PATTERNS: dict[str, Any] = {
    "house": lambda w: "house" in w,
    "RED": lambda w: "red" in w,
    "red house": lambda w: "red" in w and "house" in w,
    '"red house"': lambda w: adjacent(w, "red", "house"),
    '"the red house"': lambda w: adjacent(w, "the", "red", "house"),
    "red -house": lambda w: "red" in w and "house" not in w,
    "-house": lambda w: "house" not in w,
    "cat OR moon": lambda w: "cat" in w or "moon" in w,
    '"red cat" OR "blue house"': lambda w: adjacent(w, "red", "cat") or adjacent(w, "blue", "house"),
    '"red house" -big': lambda w: adjacent(w, "red", "house") and "big" not in w,
    "red house -the": lambda w: "red" in w and "house" in w and "the" not in w,
    "-house OR red": lambda w: "house" not in w or "red" in w,
    "moon -cat OR house": lambda w: ("moon" in w and "cat" not in w) or "house" in w,
    "red & house": lambda w: "red" in w and "house" in w,
    "-red -house": lambda w: "red" not in w and "house" not in w,
    "cat -cat": lambda w: False,
}


def q_expected(cat: Cat, q: str) -> set[Key]:
    pred = PATTERNS[q]
    return {k for k, ts in cat.triggers.items() if any(pred(words(t["text"])) for t in ts)}


def top_ids(cat: Cat, layer: int, k: int) -> np.ndarray:
    """[d_mlp, k] highest-logit token ids of v_i . E^T, highest first."""
    return np.argsort(-cat.logits(layer), axis=1, kind="stable")[:, :k]


def detail_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, f"{r.request.url} -> {r.status_code} (wanted {status}): {r.text}"
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body
    return str(body["detail"])


# --- health, models, layers ---------------------------------------------------------------------


def test_healthz(server: str) -> None:
    r = httpx.get(f"{server}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_list_pages_and_fields(api: httpx.Client, cats: dict[str, Cat], engine: Engine) -> None:
    with engine.connect() as c:
        names = list(c.scalars(text("SELECT name FROM catalog_models ORDER BY name")))
    for limit in (1, 2, 100):
        got: list[dict[str, Any]] = []
        cursor = None
        while True:
            body = ok(api.get("/models", params={"limit": limit} | ({"cursor": cursor} if cursor else {})))
            assert len(body["items"]) <= limit
            got += body["items"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert [m["name"] for m in got] == names
    by_name = {m["name"]: m for m in got}
    for cat in cats.values():
        m = by_name[cat.name]
        cfg = cat.model.config
        assert (m["n_layers"], m["d_model"], m["d_mlp"]) == (cat.n_layers, cfg.hidden_size, cat.d_mlp)
        assert m["vocab_size"] == cat.E.shape[0] and m["gated"] is cat.gated and m["model_type"] == cfg.model_type
        run = m["current_run"]
        assert run["id"] == cat.run_id and run["status"] == "complete"
        assert run["projection_convention"] == "raw_unembedding"
        assert run["parameters"]["top_n"] == TOP_N and run["parameters"]["window"] == WINDOW
        assert run["corpus"]["documents"] == len(cat.lines)


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_layers(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    items = ok(api.get(f"/models/{cat.name}/layers"))["items"]
    assert [it["layer"] for it in items] == list(range(cat.n_layers))
    for it in items:
        l = it["layer"]
        k, v = cat.keys[l], cat.values[l]
        cos = (k * v).sum(1) / np.linalg.norm(k, axis=1) / np.linalg.norm(v, axis=1)
        assert it["mean_alignment"] == pytest.approx(cos.mean(), abs=1e-5)
        for vecs, field_ in ((k, "key_cosine_mean"), (v, "value_cosine_mean")):
            unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
            g = unit @ unit.T
            assert it[field_] == pytest.approx((g.sum() - np.trace(g)) / (len(g) * (len(g) - 1)), abs=1e-5)
        if cat.bias is None:
            assert it["mean_bias"] is None and "bias" not in it["histograms"]
        else:
            assert it["mean_bias"] == pytest.approx(cat.bias[l].mean(), abs=1e-5)
        hist = it["histograms"]["key_norm"]
        norms = np.linalg.norm(k, axis=1)
        assert sum(hist["counts"]) == cat.d_mlp
        assert hist["edges"][0] == pytest.approx(norms.min(), rel=1e-5)
        assert hist["edges"][-1] == pytest.approx(norms.max(), rel=1e-5)
        assert {"key_norm", "value_norm", "alignment"} <= set(it["histograms"])
        labels = Counter(cat.rows[(l, n)]["suggested_label"] for n in range(cat.d_mlp))
        labels.pop(None, None)
        assert it["label_counts"] == dict(labels)


# --- one neuron -------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_neuron_record_against_weights_and_corpus(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    lead = [cat.tokenizer.bos_token_id]
    coef = {d: coefficients(cat.model, cat.gated, lead + ids)[1:] for d, ids in enumerate(cat.doc_tokens)}
    corpus_max = np.max([c.max(axis=0) for c in coef.values()], axis=0)  # [L, d_mlp]
    for layer, neuron in ((0, 0), (cat.n_layers - 1, cat.d_mlp - 1), (cat.n_layers - 1, 7)):
        rec = ok(api.get(f"/models/{cat.name}/neurons/{layer}/{neuron}"))
        k, v = cat.keys[layer, neuron], cat.values[layer, neuron]
        assert (rec["model"], rec["run_id"], rec["layer"], rec["neuron"]) == (cat.name, cat.run_id, layer, neuron)
        assert rec["key_norm"] == pytest.approx(np.linalg.norm(k), rel=1e-5)
        assert rec["value_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-5)
        assert rec["alignment"] == pytest.approx(k @ v / np.linalg.norm(k) / np.linalg.norm(v), abs=1e-5)
        assert rec["key_vector"] is None and rec["value_vector"] is None
        if cat.gated:
            u = cat.ups[layer, neuron]  # type: ignore[index]
            assert rec["bias"] is None
            assert rec["up_norm"] == pytest.approx(np.linalg.norm(u), rel=1e-5)
            assert rec["up_alignment"] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), abs=1e-5)
        else:
            assert rec["bias"] == pytest.approx(cat.bias[layer, neuron], abs=1e-6)  # type: ignore[index]
            assert rec["up_norm"] is None and rec["up_alignment"] is None and rec["negative_triggers"] is None

        # value projection: top 30 / bottom 10 of v . E^T, over the whole vocabulary
        logits = v @ cat.E.T
        order = np.argsort(-logits, kind="stable")
        assert [t["token_id"] for t in rec["value_top_tokens"]] == order[:VALUE_TOP].tolist()
        assert [t["token_id"] for t in rec["value_bottom_tokens"]] == order[::-1][:VALUE_BOTTOM].tolist()
        for t in rec["value_top_tokens"] + rec["value_bottom_tokens"]:
            assert t["logit"] == pytest.approx(logits[t["token_id"]], abs=1e-4)
            assert t["token"] == cat.decoded(t["token_id"])

        # triggers: the stored rows, with this file's next tokens and coefficients
        trig = rec["triggers"]
        stored = cat.triggers[(layer, neuron)]
        assert [(t["document"], t["position"]) for t in trig] == [(t["document"], t["position"]) for t in stored]
        assert len(trig) == TOP_N
        acts = [t["activation"] for t in trig]
        assert acts == sorted(acts, reverse=True)
        with_next = 0
        agree = 0
        top_token = int(order[0])
        for t in trig:
            ids = cat.doc_tokens[t["document"]]
            nxt = ids[t["position"] + 1] if t["position"] + 1 < len(ids) else None
            assert t["next_token_id"] == nxt
            assert t["next_token"] == (None if nxt is None else cat.decoded(nxt))
            assert t["activation"] == pytest.approx(coef[t["document"]][t["position"], layer, neuron], abs=1e-4)
            assert t["text"] == cat.tokenizer.decode(ids[: t["position"] + 1])
            with_next += nxt is not None
            agree += nxt == top_token
        assert rec["agreement_triggers"] == with_next
        assert rec["agreement"] == pytest.approx(agree / with_next)
        assert rec["activation_max"] == pytest.approx(corpus_max[layer, neuron], abs=1e-4)
        assert rec["activation_max"] == pytest.approx(trig[0]["activation"], abs=1e-6)
        if cat.gated:
            neg = rec["negative_triggers"]
            assert [(t["document"], t["position"]) for t in neg] == \
                [(t["document"], t["position"]) for t in cat.negative[(layer, neuron)]]
            assert neg[0]["activation"] == pytest.approx(min(c[:, layer, neuron].min() for c in coef.values()), abs=1e-4)

        # ?vectors=true: the weights themselves
        rec = ok(api.get(f"/models/{cat.name}/neurons/{layer}/{neuron}", params={"vectors": "true"}))
        np.testing.assert_allclose(rec["key_vector"], k, atol=1e-5)
        np.testing.assert_allclose(rec["value_vector"], v, atol=1e-5)
        if cat.gated:
            np.testing.assert_allclose(rec["up_vector"], cat.ups[layer, neuron], atol=1e-5)  # type: ignore[index]
        else:
            assert rec["up_vector"] is None


# --- search: filters ----------------------------------------------------------------------------------


def test_search_all_and_summaries(api: httpx.Client, cats: dict[str, Cat]) -> None:
    for cat in cats.values():
        body = ok(api.get(f"/models/{cat.name}/neurons", params={"limit": 500}))
        assert body["next_cursor"] is None and body["resolved_tokens"] == {}
        assert keys_of(body["items"]) == cat.all_keys
        tops = {l: top_ids(cat, l, 5) for l in range(cat.n_layers)}
        for it in body["items"]:
            key = (it["layer"], it["neuron"])
            for stat in NEURON_STATS:
                assert it[stat] == cat.rows[key][stat]
            assert it["suggested_label"] == cat.rows[key]["suggested_label"]
            assert [t["token_id"] for t in it["top_tokens"]] == tops[key[0]][key[1]].tolist()
            first = cat.triggers[key][0]
            assert it["top_trigger"]["text"] == first["text"]
            assert it["top_trigger"]["activation"] == first["coefficient"]


def test_search_layers(api: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["spaced"]  # three layers
    assert cat.n_layers == 3
    cases: list[tuple[dict[str, Any], set[int]]] = [
        ({"layer": [0, 2]}, {0, 2}),
        ({"layer": [1]}, {1}),
        ({"layer": [2, 2, 0]}, {0, 2}),
        ({"layer_min": 1}, {1, 2}),
        ({"layer_max": 1}, {0, 1}),
        ({"layer_min": 1, "layer_max": 1}, {1}),
        ({"layer": [0, 2], "layer_min": 1}, {2}),
    ]
    for params, layers in cases:
        for sort in (None, "-key_norm"):
            want = expected_order(cat, {k for k in cat.all_keys if k[0] in layers}, sort)
            items, _ = pages(api, cat.name, params | {"sort": sort}, limit=11)
            assert keys_of(items) == want, params
    # an empty range is a mistake (issue 15), not a question whose answer is empty
    r = api.get(f"/models/{cat.name}/neurons", params={"layer_min": 2, "layer_max": 1})
    assert r.status_code == 422 and "layer_min" in r.json()["detail"], r.text


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_search_statistic_ranges(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    discriminating = 0
    for stat in NEURON_STATS:
        present = sorted(r[stat] for r in cat.rows.values() if r[stat] is not None)
        if not present:  # e.g. bias of a Llama: no neuron has it, so no bound admits any
            body = ok(api.get(f"/models/{cat.name}/neurons", params={f"min_{stat}": -1e30, "limit": 500}))
            assert body["items"] == []
            continue
        lo, hi = present[len(present) // 4], present[(3 * len(present)) // 4]  # stored values: bounds inclusive
        for params in ({f"min_{stat}": lo}, {f"max_{stat}": hi}, {f"min_{stat}": lo, f"max_{stat}": hi}):
            want = {k for k, r in cat.rows.items() if r[stat] is not None
                    and r[stat] >= params.get(f"min_{stat}", -math.inf) and r[stat] <= params.get(f"max_{stat}", math.inf)}
            discriminating += 0 < len(want) < len(cat.rows)
            body = ok(api.get(f"/models/{cat.name}/neurons", params=params | {"limit": 500}))
            assert keys_of(body["items"]) == sorted(want), (stat, params)
    assert discriminating >= 20  # most bounds keep some neurons and drop others
    # several ranges at once are ANDed
    a, b = "key_norm", "activation_max"
    ka = sorted(r[a] for r in cat.rows.values())[cat.d_mlp // 2]
    kb = sorted(r[b] for r in cat.rows.values())[cat.d_mlp]
    want = {k for k, r in cat.rows.items() if r[a] >= ka and r[b] <= kb}
    body = ok(api.get(f"/models/{cat.name}/neurons", params={f"min_{a}": ka, f"max_{b}": kb, "limit": 500}))
    assert keys_of(body["items"]) == sorted(want)


def test_search_label(api: httpx.Client, cats: dict[str, Cat]) -> None:
    seen = 0
    for cat in cats.values():
        for lab in LABELS:
            want = sorted(k for k, r in cat.rows.items() if r["suggested_label"] == lab)
            seen += len(want)
            items, _ = pages(api, cat.name, {"label": lab}, limit=500)
            assert keys_of(items) == want
            assert all(it["suggested_label"] == lab for it in items)
    assert seen > 0


def test_q_reference_agrees_with_postgres(cats: dict[str, Cat], engine: Engine) -> None:
    """Checks the test's own reading of web-search syntax, prefix by prefix, against Postgres itself."""
    texts = sorted({t["text"] for cat in cats.values() for ts in cat.triggers.values() for t in ts})
    with engine.connect() as c:
        for q, pred in PATTERNS.items():
            pg: dict[str, bool] = dict(c.execute(text(
                "SELECT t, to_tsvector('simple', t) @@ websearch_to_tsquery('simple', :q) "
                "FROM unnest(CAST(:ts AS text[])) AS t"), {"q": q, "ts": texts}).tuples().all())
            assert {t for t in texts if pred(words(t))} == {t for t, m in pg.items() if m}, q


def test_search_q_per_prefix(api: httpx.Client, cats: dict[str, Cat]) -> None:
    # The patterns must tell per-prefix matching from matching the union of a neuron's prefixes.
    union_only = {q: 0 for q in ("red house", "red -house", '"red house"')}
    for cat in cats.values():
        for q in PATTERNS:
            want = q_expected(cat, q)
            items, _ = pages(api, cat.name, {"q": q}, limit=500)
            assert keys_of(items) == sorted(want), (cat.label, q, sorted(set(keys_of(items)) ^ want))
        for ts in cat.triggers.values():
            ws = [words(t["text"]) for t in ts]
            has_red, has_house = any("red" in w for w in ws), any("house" in w for w in ws)
            if has_red and has_house and not any("red" in w and "house" in w for w in ws):
                union_only["red house"] += 1  # both words, never in one prefix: no match
            if any("red" in w and "house" not in w for w in ws) and any("red" in w and "house" in w for w in ws):
                union_only["red -house"] += 1  # a match although another prefix has both words
            if any("red" in w and "house" in w for w in ws) and not any(adjacent(w, "red", "house") for w in ws):
                union_only['"red house"'] += 1  # both words in one prefix, not as a phrase: no match
    assert all(n > 0 for n in union_only.values()), union_only
    # q combines with other filters and sorts
    cat = cats["gpt2"]
    want = {k for k in q_expected(cat, "RED") if k[0] == 1}
    items, _ = pages(api, cat.name, {"q": "red", "layer": 1, "sort": "-activation_max"}, limit=3)
    assert keys_of(items) == expected_order(cat, want, "-activation_max")


def _token_forms(cat: Cat) -> list[tuple[str, list[int]]]:
    """Token arguments and the ids this file expects them to name."""
    cat_id = cat.tokenizer.convert_tokens_to_ids("cat")
    forms = [("cat", cat.word_ids("cat")), (f"id:{cat_id}", [cat_id]), ("text:cat", [cat_id]),
             ("house", cat.word_ids("house")), ("id:1", [1]), ("text:<s>", [1])]
    if cat.label == "spaced":
        sp = cat.tokenizer.convert_tokens_to_ids(api_server.SPACE + "cat")
        assert cat.decoded(sp) == " cat" and cat.decoded(cat_id) == "cat"
        assert sorted(cat.word_ids("cat")) == sorted([cat_id, sp])
        forms += [(" cat", [sp]), (api_server.SPACE + "cat", [sp]), ("text: cat", [sp]), (" house", cat.word_ids(" house"))]
    else:
        assert cat.word_ids("cat") == [cat_id]
    return forms


def test_tokens_table_has_space_marked_texts(cats: dict[str, Cat], engine: Engine) -> None:
    cat = cats["spaced"]
    with engine.connect() as c:
        stored: dict[int, str] = dict(c.execute(text("SELECT token_id, text FROM tokens WHERE run_id = :r"), {"r": cat.run_id}).tuples().all())
    assert len(stored) == cat.E.shape[0]
    sp = cat.tokenizer.convert_tokens_to_ids(api_server.SPACE + "cat")
    assert stored[sp] == " cat" and stored[cat.tokenizer.convert_tokens_to_ids("cat")] == "cat"
    assert sum(t.startswith(" ") for t in stored.values()) == len(tiny_models.WORDS)


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_search_token_promoted(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    tops = {l: top_ids(cat, l, VALUE_TOP) for l in range(cat.n_layers)}
    for given, ids in _token_forms(cat):
        for rank in (1, 3, 10, VALUE_TOP):
            want = {(l, n) for l in range(cat.n_layers) for n in range(cat.d_mlp) if set(tops[l][n][:rank]) & set(ids)}
            items, _ = pages(api, cat.name, {"token": given, "token_rank": rank}, limit=500)
            assert keys_of(items) == sorted(want), (given, rank)
        body = ok(api.get(f"/models/{cat.name}/neurons", params={"token": given, "token_rank": 3}))
        assert body["resolved_tokens"]["token"]["token_ids"] == sorted(ids)
        assert body["resolved_tokens"]["token"]["tokens"] == [cat.decoded(i) for i in sorted(ids)]


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_search_trigger_and_next_token(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]

    def last_and_next(t: dict[str, Any]) -> tuple[int, int | None]:
        ids = cat.doc_tokens[t["document"]]
        return ids[t["position"]], ids[t["position"] + 1] if t["position"] + 1 < len(ids) else None

    nonempty = 0
    for given, ids in _token_forms(cat):
        for param, which in (("trigger_token", 0), ("next_token", 1)):
            want = {k for k, ts in cat.triggers.items() if any(last_and_next(t)[which] in ids for t in ts)}
            nonempty += bool(want)
            body = ok(api.get(f"/models/{cat.name}/neurons", params={param: given, "limit": 500}))
            assert keys_of(body["items"]) == sorted(want), (param, given)
            assert body["resolved_tokens"][param]["token_ids"] == sorted(ids)
    assert nonempty >= 4
    # both at once, with a layer: every filter applies
    cat_ids, house_ids = cat.word_ids("red"), cat.word_ids("house")
    want = {k for k, ts in cat.triggers.items() if k[0] == 0
            and any(last_and_next(t)[0] in cat_ids for t in ts) and any(last_and_next(t)[1] in house_ids for t in ts)}
    body = ok(api.get(f"/models/{cat.name}/neurons",
                      params={"trigger_token": "red", "next_token": "house", "layer": 0, "limit": 500}))
    assert keys_of(body["items"]) == sorted(want)


# --- search: sorts and pages ------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_sorts_paginated(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    limit = 7 if label == "spaced" else 16  # 16: the last page is exactly full (48 neurons) and has no cursor
    for sort in SORTS:
        items, n = pages(api, cat.name, {"sort": sort}, limit=limit)
        got = keys_of(items)
        assert len(set(got)) == len(got), f"duplicates with sort={sort}"
        assert got == expected_order(cat, set(cat.all_keys), sort), sort
        assert n == math.ceil(len(cat.all_keys) / limit)


def test_page_size_may_change_between_pages(api: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["spaced"]
    for sort in ("-ablation_last", "bias", None):
        got: list[Key] = []
        cursor = None
        for i in range(200):
            params = {"limit": (5, 1, 9)[i % 3]} | ({"sort": sort} if sort else {}) | ({"cursor": cursor} if cursor else {})
            body = ok(api.get(f"/models/{cat.name}/neurons", params=params))
            got += keys_of(body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert got == expected_order(cat, set(cat.all_keys), sort)


def test_sort_data_exercises_ties_and_nulls(cats: dict[str, Cat]) -> None:
    """The sorts above are only meaningful if ties and partly-null figures occur in these catalogs."""
    spaced = cats["spaced"]
    assert len({r["bias"] for r in spaced.rows.values()}) == 1  # fresh GPT-2 biases: all tied
    mixed = [s for s in NEURON_STATS if 0 < sum(r[s] is None for r in spaced.rows.values()) < len(spaced.rows)]
    assert mixed, "no partly-null figure: the null phase of keyset pages is untested"
    assert all(r["bias"] is None for r in cats["llama"].rows.values())
    agreement = Counter(r["agreement"] for r in cats["gpt2"].rows.values())
    assert agreement.most_common(1)[0][1] > 1


@pytest.mark.parametrize("label", ["gpt2", "spaced"])
def test_filtered_sorts_paginated(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    median = sorted(r["key_norm"] for r in cat.rows.values())[len(cat.rows) // 2]
    cases: list[tuple[dict[str, Any], set[Key]]] = [
        ({"q": "red"}, q_expected(cat, "RED")),
        ({"min_key_norm": median, "layer_min": 1}, {k for k, r in cat.rows.items() if r["key_norm"] >= median and k[0] >= 1}),
        ({"q": "red -house", "max_key_norm": median}, {k for k in q_expected(cat, "red -house") if cat.rows[k]["key_norm"] <= median}),
    ]
    for params, want in cases:
        assert want
        for sort in ("-ablation_last", "ablation_last", "-agreement", "bias", "-layer", None):
            for limit in ((1, 7) if sort == "-ablation_last" else (7,)):
                items, _ = pages(api, cat.name, params | {"sort": sort}, limit=limit)
                assert keys_of(items) == expected_order(cat, want, sort), (params, sort, limit)


def test_pages_stay_consistent_while_another_catalog_is_extracted(
    api: httpx.Client, cats: dict[str, Cat], engine: Engine, workdir: Path,
) -> None:
    cat = cats["spaced"]
    name = f"api-concurrent-{TAG}"
    errors: list[BaseException] = []

    def work() -> None:
        try:
            extract(ExtractRequest(model=str(cats["gpt2"].directory), name=name, corpus=str(workdir / "corpus.txt"),
                                   params=default_parameters(**PARAMS)), engine=engine)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    overlapped = 0
    sorts = ["-ablation_last", "agreement", None, "-bias", "key_norm"]
    try:
        i = 0
        while thread.is_alive() or i < len(sorts):
            sort = sorts[i % len(sorts)]
            alive = thread.is_alive()
            items, _ = pages(api, cat.name, {"sort": sort}, limit=7)
            assert keys_of(items) == expected_order(cat, set(cat.all_keys), sort), sort
            # the catalog being written is listed without a run until it is published, then complete
            listed = {m["name"]: m for m in ok(api.get("/models", params={"limit": 500}))["items"]}
            run = listed[name]["current_run"] if name in listed else None
            assert run is None or run["status"] == "complete"
            overlapped += alive and thread.is_alive()
            i += 1
            assert i < 2000
    finally:
        thread.join(timeout=120)
    assert not errors, errors
    assert overlapped > 0, "the extraction ended before a full scan ran beside it"
    names = [m["name"] for m in ok(api.get("/models", params={"limit": 500}))["items"]]
    assert name in names
    # the new catalog is complete and searchable
    assert len(ok(api.get(f"/models/{name}/neurons", params={"limit": 500}))["items"]) == 2 * tiny_models.D_MLP


def test_cursor_of_a_replaced_run_is_refused(api: httpx.Client, cats: dict[str, Cat], engine: Engine) -> None:
    name = f"api-reextract-{TAG}"
    directory = cats["gpt2"].directory
    extract(ExtractRequest(model=str(directory), name=name), engine=engine)
    first = ok(api.get(f"/models/{name}/neurons", params={"limit": 7, "sort": "-key_norm"}))
    assert first["next_cursor"]
    extract(ExtractRequest(model=str(directory), name=name), engine=engine)
    msg = detail_error(api.get(f"/models/{name}/neurons",
                               params={"limit": 7, "sort": "-key_norm", "cursor": first["next_cursor"]}), 422)
    assert "run" in msg
    # a fresh scan of the new run is whole
    items, _ = pages(api, name, {"sort": "-key_norm"}, limit=7)
    assert len(items) == 2 * tiny_models.D_MLP and len(set(keys_of(items))) == len(items)


def test_weights_only_catalog(api: httpx.Client, engine: Engine, workdir: Path) -> None:
    """No corpus: no triggers, null corpus figures; and a tokenizer without BOS (probed without one)."""
    name = f"api-weights-{TAG}"
    directory = tiny_models.save("gpt2", workdir / "nobos", seed=4, bos=False)
    extract(ExtractRequest(model=str(directory), name=name), engine=engine)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    keys, _, _, _ = weights(model, gated=False)
    search = f"/models/{name}/neurons"
    for params in ({"q": "red"}, {"trigger_token": "cat"}, {"next_token": "cat"}, {"label": "semantic"},
                   {"min_activation_max": -1e30}, {"max_agreement": 1e30}):
        assert ok(api.get(search, params=params))["items"] == [], params
    all_keys = [(l, n) for l in range(tiny_models.N_LAYERS) for n in range(tiny_models.D_MLP)]
    for sort in ("-activation_max", "agreement", "-key_norm"):
        items, _ = pages(api, name, {"sort": sort}, limit=7)
        if sort == "-key_norm":
            norms = {k: float(np.linalg.norm(keys[k])) for k in all_keys}
            assert keys_of(items) == sorted(all_keys, key=lambda k: (-norms[k], -k[0], -k[1]))
        else:  # every figure null: (layer, neuron) order
            assert keys_of(items) == all_keys
    rec = ok(api.get(f"/models/{name}/neurons/1/4"))
    assert rec["triggers"] == [] and rec["agreement_triggers"] == 0
    assert rec["activation_max"] is None and rec["agreement"] is None and rec["suggested_label"] is None
    assert rec["key_norm"] == pytest.approx(np.linalg.norm(keys[1, 4]), rel=1e-5)
    assert all(it["mean_agreement"] is None for it in ok(api.get(f"/models/{name}/layers"))["items"])
    # the probe reads the text as the corpus pass would: no BOS for this tokenizer
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.bos_token_id is None
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    body = ok(api.post(f"/models/{name}/probe", json={"text": "the cat sat on the mat", "k": 4}))
    flat = coefficients(model, False, ids).reshape(len(ids), -1)
    assert [t["token_id"] for t in body["tokens"]] == ids
    for p, t in enumerate(body["tokens"]):
        want = np.argsort(-flat[p], kind="stable")[:4]
        np.testing.assert_allclose([n["coefficient"] for n in t["neurons"]], flat[p][want], atol=1e-4)
        assert [n["layer"] * tiny_models.D_MLP + n["neuron"] for n in t["neurons"]] == want.tolist()


def test_probe_follows_the_current_run_and_refuses_changed_weights(api: httpx.Client, engine: Engine,
                                                                  workdir: Path) -> None:
    name = f"api-probe-{TAG}"
    probe_text = "the red house is big"

    def expected_top(directory: Path) -> list[tuple[int, int, float]]:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(directory)
        ids = [tok.bos_token_id] + tok(probe_text, add_special_tokens=False)["input_ids"]
        best = coefficients(model, False, ids)[1:].reshape(len(ids) - 1, -1).max(axis=0)
        return [(int(w) // tiny_models.D_MLP, int(w) % tiny_models.D_MLP, float(best[w]))
                for w in np.argsort(-best, kind="stable")[:5]]

    def probed() -> list[tuple[int, int, float]]:
        body = ok(api.post(f"/models/{name}/probe", json={"text": probe_text, "k": 5}))
        return [(n["layer"], n["neuron"], n["coefficient"]) for n in body["top"]]

    def same(a: list[tuple[int, int, float]], b: list[tuple[int, int, float]]) -> bool:
        return [x[:2] for x in a] == [x[:2] for x in b] and all(abs(x[2] - y[2]) < 1e-4 for x, y in zip(a, b))

    first = tiny_models.save("gpt2", workdir / "probe-a", seed=6)
    extract(ExtractRequest(model=str(first), name=name), engine=engine)
    assert same(probed(), expected_top(first))
    second = tiny_models.save("gpt2", workdir / "probe-b", seed=7)
    extract(ExtractRequest(model=str(second), name=name), engine=engine)  # a new run: the model is reloaded
    assert not same(expected_top(first), expected_top(second))
    assert same(probed(), expected_top(second))
    # the files of a newly published run change before its first probe: refused, not silently used
    third = tiny_models.save("gpt2", workdir / "probe-c", seed=8)
    extract(ExtractRequest(model=str(third), name=name), engine=engine)
    changed: Any = tiny_models.build("gpt2", seed=9)
    changed.save_pretrained(third)
    msg = detail_error(api.post(f"/models/{name}/probe", json={"text": probe_text, "k": 5}), 409)
    assert "weights" in msg


# --- vector queries ----------------------------------------------------------------------------------


@pytest.fixture(params=["list", "scan"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the answer comes from: the run's stored exact lists, or (as for a run from before part 10,
    or an answer beyond the lists) a scan of every vector in range. The server runs in this process:
    the patch applies to it at once."""
    if request.param == "scan":
        monkeypatch.setattr(vectors, "in_range", lambda *a, **kw: None)
    return str(request.param)


def _check_ranking(items: list[dict[str, Any]], scores: dict[Key, float], k: int, field_: str) -> None:
    """Exactly numpy's first k, ties by (layer, neuron); scores within float32's precision."""
    want = sorted(scores, key=lambda key: (-scores[key], key))[:k]
    got = keys_of(items)
    for it in items:
        assert it[field_] == pytest.approx(scores[(it["layer"], it["neuron"])], rel=1e-5, abs=1e-6)
    assert got == want


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_token_ranking(api: httpx.Client, cats: dict[str, Cat], label: str, method: str) -> None:
    cat = cats[label]
    for given, ids in _token_forms(cat):
        for k, lo, hi in ((10, None, None), (5, 1, 1), (48, 0, cat.n_layers - 1), (3, cat.n_layers - 1, None)):
            layers = range(lo or 0, (cat.n_layers - 1 if hi is None else hi) + 1)
            scores: dict[Key, float] = {}
            best_id: dict[Key, int] = {}
            for l in layers:
                for n in range(cat.d_mlp):
                    per = {i: float(cat.values[l, n] @ cat.E[i]) for i in ids}
                    best_id[(l, n)] = max(per, key=per.__getitem__)
                    scores[(l, n)] = per[best_id[(l, n)]]
            params = {"k": k} | ({"layer_min": lo} if lo is not None else {}) | ({"layer_max": hi} if hi is not None else {})
            body = ok(api.get(f"/models/{cat.name}/tokens/{given}/neurons", params=params))
            assert body["method"] == "exact" and body["complete"] is True
            assert body["resolved_tokens"]["token"]["token_ids"] == sorted(ids)
            assert body["order"] == "logit"
            _check_ranking(body["items"], scores, k, "logit")
            for it in body["items"]:
                key = (it["layer"], it["neuron"])
                assert it["token_id"] == best_id[key]
                assert it["value_norm"] == pytest.approx(np.linalg.norm(cat.values[key]), rel=1e-5)


@pytest.mark.parametrize("label", ["gpt2", "llama", "spaced"])
def test_similar_neurons(api: httpx.Client, cats: dict[str, Cat], label: str, method: str) -> None:
    cat = cats[label]
    for space, vecs in (("key", cat.keys), ("value", cat.values)):
        unit = vecs / np.linalg.norm(vecs, axis=2, keepdims=True)
        for (layer, neuron), k, lo, hi in (((0, 3), 10, None, None), ((1, 5), 47, None, None),
                                           ((0, 0), 6, 1, cat.n_layers - 1), ((1, 2), 4, 1, 1)):
            layers = range(lo or 0, (cat.n_layers - 1 if hi is None else hi) + 1)
            scores = {(l, n): float(unit[l, n] @ unit[layer, neuron]) for l in layers for n in range(cat.d_mlp)
                      if (l, n) != (layer, neuron)}
            params: dict[str, Any] = {"space": space, "k": k} | ({"layer_min": lo} if lo is not None else {}) | \
                ({"layer_max": hi} if hi is not None else {})
            body = ok(api.get(f"/models/{cat.name}/neurons/{layer}/{neuron}/similar", params=params))
            assert body["method"] == "exact" and body["space"] == space
            assert (layer, neuron) not in keys_of(body["items"])
            _check_ranking(body["items"], scores, k, "cosine")


# --- probe --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["gpt2", "llama"])
def test_probe_against_forward_pass_and_corpus_pass(api: httpx.Client, cats: dict[str, Cat], label: str) -> None:
    cat = cats[label]
    for text_, k in (("the red house is big and the cat sat on the mat .", 10), ("moon", 3), ("red cat", 100)):
        body = ok(api.post(f"/models/{cat.name}/probe", json={"text": text_, "k": k}))
        ids = cat.tokenizer(text_, add_special_tokens=False)["input_ids"]
        coef = coefficients(cat.model, cat.gated, [cat.tokenizer.bos_token_id] + ids)[1:]  # BOS dropped
        flat = coef.reshape(len(ids), -1)
        d = cat.d_mlp
        assert (body["model"], body["run_id"]) == (cat.name, cat.run_id)
        assert [t["token_id"] for t in body["tokens"]] == ids
        assert [t["position"] for t in body["tokens"]] == list(range(len(ids)))
        assert [t["token"] for t in body["tokens"]] == [cat.decoded(i) for i in ids]
        for p, tok in enumerate(body["tokens"]):
            want = np.argsort(-flat[p], kind="stable")[:k]
            assert [(n["layer"], n["neuron"]) for n in tok["neurons"]] == [(int(w) // d, int(w) % d) for w in want]
            np.testing.assert_allclose([n["coefficient"] for n in tok["neurons"]], flat[p][want], atol=1e-4)
        best = flat.max(axis=0)
        want = np.argsort(-best, kind="stable")[:k]
        assert [(n["layer"], n["neuron"]) for n in body["top"]] == [(int(w) // d, int(w) % d) for w in want]
        np.testing.assert_allclose([n["coefficient"] for n in body["top"]], best[want], atol=1e-4)

        # the corpus pass over a one-document corpus of the text finds the same maxima
        corpus = tokenise([Document(0, text_)], cat.tokenizer, window=WINDOW)
        result = corpus_pass(cat.model, value_projections(cat.model, cat.gated), corpus, top_n=1, gated=cat.gated,
                             batch_tokens=4096, pad=0)
        maxima = torch.stack([s.summary()["max"] for s in result.stats]).double().numpy()  # [L, d_mlp]
        for n in body["top"]:
            assert n["coefficient"] == pytest.approx(maxima[n["layer"], n["neuron"]], abs=1e-4)


def test_probe_length_limit_is_one_window(api: httpx.Client, cats: dict[str, Cat]) -> None:
    cat = cats["gpt2"]
    fits = " ".join(["cat"] * (WINDOW - 1))  # BOS takes the window's first slot
    body = ok(api.post(f"/models/{cat.name}/probe", json={"text": fits, "k": 2}))
    assert len(body["tokens"]) == WINDOW - 1
    detail_error(api.post(f"/models/{cat.name}/probe", json={"text": fits + " dog", "k": 2}), 422)


# --- errors -------------------------------------------------------------------------------------------


def test_errors(api: httpx.Client, cats: dict[str, Cat]) -> None:
    g = cats["gpt2"].name
    other = cats["spaced"].name
    search = f"/models/{g}/neurons"
    cursor = ok(api.get(search, params={"limit": 7, "sort": "key_norm"}))["next_cursor"]
    other_cursor = ok(api.get(f"/models/{other}/neurons", params={"limit": 7, "sort": "key_norm"}))["next_cursor"]
    assert cursor and other_cursor
    long_text = " ".join(["red"] * 200)
    cases: list[tuple[str, str, dict[str, Any] | None, Any, int]] = [
        # (method, path, query, json body, status)
        ("GET", search, {"min_foo": 1}, None, 422),
        ("GET", search, {"max_key_normal": 1}, None, 422),
        ("GET", search, {"min_key_norm": "abc"}, None, 422),
        ("GET", search, {"min_key_norm": "nan"}, None, 422),
        ("GET", search, {"max_key_norm": "inf"}, None, 422),
        ("GET", search, {"sort": "foo"}, None, 422),
        ("GET", search, {"sort": "-foo"}, None, 422),
        ("GET", search, {"sort": "--key_norm"}, None, 422),
        ("GET", search, {"label": "deep"}, None, 422),
        ("GET", search, {"cursor": "garbage!!"}, None, 422),
        ("GET", search, {"cursor": "eyJ4IjoxfQ"}, None, 422),  # valid base64 JSON, not a cursor
        ("GET", search, {"cursor": cursor, "sort": "value_norm"}, None, 422),  # another sort
        ("GET", search, {"cursor": cursor, "sort": "key_norm", "layer": 1}, None, 422),  # other filters
        ("GET", search, {"cursor": cursor}, None, 422),  # default sort
        ("GET", search, {"cursor": other_cursor, "sort": "key_norm"}, None, 422),  # another catalog's run
        ("GET", search, {"layer": 2}, None, 422),
        ("GET", search, {"layer": -1}, None, 422),
        ("GET", search, {"layer_min": 5}, None, 422),
        ("GET", search, {"layer_max": 2}, None, 422),
        ("GET", search, {"limit": 0}, None, 422),
        ("GET", search, {"limit": 501}, None, 422),
        ("GET", search, {"q": ",,,"}, None, 422),
        ("GET", search, {"q": "   "}, None, 422),
        ("GET", search, {"q": ""}, None, 422),
        ("GET", search, {"q": "x" * 501}, None, 422),
        ("GET", search, {"token": "zebra"}, None, 422),
        ("GET", search, {"token": "id:99999"}, None, 422),
        ("GET", search, {"token": "id:x"}, None, 422),
        ("GET", search, {"token": "text:Cat"}, None, 422),
        ("GET", search, {"token": " cat"}, None, 422),  # the plain tokenizer has no space-marked form
        ("GET", search, {"token": "cat", "token_rank": VALUE_TOP + 1}, None, 422),
        ("GET", search, {"trigger_token": "zebra"}, None, 422),
        ("GET", search, {"next_token": ""}, None, 422),
        ("GET", f"/models/{g}/tokens/zebra/neurons", None, None, 422),
        ("GET", f"/models/{g}/tokens/cat/neurons", {"layer_min": 1, "layer_max": 0}, None, 422),
        ("GET", f"/models/{g}/tokens/cat/neurons", {"layer_min": 2}, None, 422),
        ("GET", f"/models/{g}/tokens/cat/neurons", {"layer_max": 9}, None, 422),
        ("GET", f"/models/{g}/tokens/cat/neurons", {"k": 0}, None, 422),
        ("GET", f"/models/{g}/tokens/cat/neurons", {"k": 501}, None, 422),
        ("GET", f"/models/{g}/neurons/0/0/similar", {"space": "up"}, None, 422),
        ("GET", f"/models/{g}/neurons/0/0/similar", {"layer_min": 1, "layer_max": 0}, None, 422),
        ("GET", f"/models/{g}/neurons/0/0/similar", {"layer_max": 2}, None, 422),
        ("POST", f"/models/{g}/probe", None, {"text": ""}, 422),
        ("POST", f"/models/{g}/probe", None, {"text": "   "}, 422),
        ("POST", f"/models/{g}/probe", None, {"text": long_text}, 422),
        ("POST", f"/models/{g}/probe", None, {"text": "cat", "k": 0}, 422),
        ("POST", f"/models/{g}/probe", None, {"text": "cat", "extra": 1}, 422),
        ("POST", f"/models/{g}/probe", None, {"k": 3}, 422),
        ("GET", "/models", {"cursor": "__8"}, None, 422),  # decodes to bytes that are not UTF-8
        # unknown model, unknown neuron
        ("GET", "/models/no-such-model/layers", None, None, 404),
        ("GET", "/models/no-such-model/neurons", None, None, 404),
        ("GET", "/models/no-such-model/neurons/0/0", None, None, 404),
        ("GET", "/models/no-such-model/neurons/0/0/similar", None, None, 404),
        ("GET", "/models/no-such-model/tokens/cat/neurons", None, None, 404),
        ("POST", "/models/no-such-model/probe", None, {"text": "cat"}, 404),
        ("GET", f"/models/{g}/neurons/0/{tiny_models.D_MLP}", None, None, 404),
        ("GET", f"/models/{g}/neurons/2/0", None, None, 404),
        ("GET", f"/models/{g}/neurons/2/0", {"vectors": "true"}, None, 404),
        ("GET", f"/models/{g}/neurons/0/{tiny_models.D_MLP}/similar", None, None, 404),
        ("GET", f"/models/{g}/neurons/5/0/similar", None, None, 404),
    ]
    failures = []
    for method_, path, params, body, status in cases:
        r = api.request(method_, path, params=params, json=body)
        if r.status_code != status or not isinstance(r.json().get("detail"), str) or set(r.json()) != {"detail"}:
            failures.append((method_, path, params, body, r.status_code, r.text[:300]))
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize("label", ["gpt2", "llama"])
def test_folded_projection_in_search_and_ranking(api: httpx.Client, cats: dict[str, Cat], label: str,
                                                 method: str) -> None:
    """projection=folded: the token filter and token ranking score v . (E * g)^T, g the final norm's
    gain read here from the model's own state dict."""
    cat = cats[label]
    gain = cat.model.state_dict()[tiny_models.FINAL_NORM["llama" if label == "llama" else "gpt2"]].double().numpy()
    assert np.abs(gain - 1).max() > 0.1  # tiny_models randomises it, so folded differs from raw
    folded_e = cat.E * gain
    tops = {l: np.argsort(-(cat.values[l] @ folded_e.T), axis=1, kind="stable")[:, :VALUE_TOP]
            for l in range(cat.n_layers)}
    differs = False
    for given, ids in _token_forms(cat)[:4]:
        want = {(l, n) for l in range(cat.n_layers) for n in range(cat.d_mlp) if set(tops[l][n][:3]) & set(ids)}
        items, _ = pages(api, cat.name, {"token": given, "token_rank": 3, "projection": "folded"}, limit=500)
        assert keys_of(items) == sorted(want), given
        raw, _ = pages(api, cat.name, {"token": given, "token_rank": 3}, limit=500)
        differs |= keys_of(raw) != keys_of(items)
        # the summaries show the folded top tokens too
        for it in items[:5]:
            assert [t["token_id"] for t in it["top_tokens"]] == list(tops[it["layer"]][it["neuron"]][:len(it["top_tokens"])])
        scores = {(l, n): max(float(cat.values[l, n] @ folded_e[i]) for i in ids)
                  for l in range(cat.n_layers) for n in range(cat.d_mlp)}
        body = ok(api.get(f"/models/{cat.name}/tokens/{given}/neurons", params={"k": 10, "projection": "folded"}))
        assert body["method"] == "exact"
        _check_ranking(body["items"], scores, 10, "logit")
    assert differs, "folding changed no search result: the check is vacuous"
    detail_error(api.get(f"/models/{cat.name}/neurons", params={"projection": "tilted"}), 422)
    detail_error(api.get(f"/models/{cat.name}/tokens/cat/neurons", params={"projection": "tilted"}), 422)
