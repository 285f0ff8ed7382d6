"""Token ranking's orders (logit, rank, cosine, effect) over HTTP, against a real uvicorn server and the
session's Postgres, held against numpy over the model's own weights.

The catalog is the space-marked tiny GPT-2 of tests/api_server.py (vocabulary 64: 'cat' and ' cat'),
with a random final-norm gain (so that projection=folded differs from raw), a seeded corpus (for
order=effect's coefficients) and only 12 stored top tokens per neuron, so that most ranks lie beyond
the stored lists and the vocabulary-wide rank computation is exercised. Nothing here calls
``catalog.read``: ranks, cosines and logits come from the weights; the coefficients (corpus figures
whose own tests are elsewhere) are read with plain SQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_server
import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import text
from sqlalchemy.engine import Engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from catalog.config import settings
from catalog.read import vectors
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters

TAG = uuid.uuid4().hex[:6]
STORED_TOP = 12
ORDERS = ("logit", "rank", "cosine", "effect")
Key = tuple[int, int]
pytestmark = pytest.mark.usefixtures("one_thread")


class Ref:
    """The catalog's model as numpy: values [L, d_mlp, d], E [V, d], the final norm's gain g."""

    def __init__(self, name: str, directory: Path, run_id: int, engine: Engine) -> None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.name, self.run_id = name, run_id
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.values = np.stack([b.mlp.c_proj.weight.detach().double().numpy() for b in model.transformer.h])
        self.E = model.get_output_embeddings().weight.detach().double().numpy()
        self.gain = model.transformer.ln_f.weight.detach().double().numpy()
        self.n_layers, self.d_mlp = self.values.shape[:2]
        with engine.connect() as c:
            rows = c.execute(text("SELECT layer, neuron, abs_coefficient_p99, activation_max FROM neurons "
                                  "WHERE run_id = :r"), {"r": run_id}).tuples().all()
        self.coef = {(a, b): p for a, b, p, _ in rows}
        self.amax = {(a, b): m for a, b, _, m in rows}

    def decoded(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def ids(self, word: str) -> list[int]:
        return [i for i in range(self.E.shape[0]) if self.decoded(i) in (word, " " + word)]

    def figures(self, ids: list[int], projection: str, layers: range) -> dict[Key, dict[int, dict[str, Any]]]:
        """Per neuron and form: logit, cosine, rank over the whole vocabulary, effect (numpy, float64)."""
        E = self.E * self.gain if projection == "folded" else self.E
        out: dict[Key, dict[int, dict[str, Any]]] = {}
        for layer in layers:
            logits = self.values[layer] @ E.T  # [d_mlp, V]
            for n in range(self.d_mlp):
                v = self.values[layer, n]
                per: dict[int, dict[str, Any]] = {}
                for t in ids:
                    logit = float(logits[n, t])
                    c = self.coef[(layer, n)]
                    per[t] = {"logit": logit, "cosine": logit / (np.linalg.norm(v) * np.linalg.norm(E[t])),
                              "rank": 1 + int((np.delete(logits[n], t) > logit).sum()),
                              "effect": None if c is None else c * logit, "coefficient": c,
                              "value_norm": float(np.linalg.norm(v))}
                out[(layer, n)] = per
        return out


def key_of(order: str, f: dict[str, Any], layer: int, neuron: int) -> tuple[float, ...]:
    if order == "rank":
        return (f["rank"], -f["cosine"], layer, neuron)
    return (-f[order], layer, neuron)


def expected(figs: dict[Key, dict[int, dict[str, Any]]], order: str) -> list[tuple[Key, int]]:
    """(neuron, the form that places it) in the order's order; effect leaves out neurons without a coefficient."""
    best: dict[Key, tuple[tuple[float, ...], int]] = {}
    for key, per in figs.items():
        for t, f in per.items():
            if order == "effect" and f["effect"] is None:
                continue
            k = key_of(order, f, *key)
            if key not in best or k < best[key][0]:
                best[key] = (k, t)
    return [(key, t) for key, (_, t) in sorted(best.items(), key=lambda kv: kv[1][0])]


@pytest.fixture(scope="module")
def ref(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ref]:
    work = tmp_path_factory.mktemp("orders")
    directory = api_server.save_spaced_gpt2(work / "spaced", seed=7, n_layers=3)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():  # a final-norm gain other than 1: folded differs from raw
        gen = torch.Generator().manual_seed(8)
        model.transformer.ln_f.weight.copy_(torch.rand(model.transformer.ln_f.weight.shape, generator=gen) * 2.8 + 0.2)
    model.save_pretrained(directory)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(21, 120)) + "\n", encoding="utf-8")
    name = f"orders-{TAG}"
    run = extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus),
                                 params=default_parameters(top_n=5, window=32, value_top=STORED_TOP)),
                  engine=engine).run_id
    try:
        yield Ref(name, directory, run, engine)
    finally:
        api_server.drop_catalog(engine, name)


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, f"{r.request.url} -> {r.status_code}: {r.text}"
    return r.json()


def ranking(api: httpx.Client, ref: Ref, given: str, **params: Any) -> dict[str, Any]:
    return ok(api.get(f"/models/{ref.name}/tokens/{given}/neurons", params=params))


def check_items(items: list[dict[str, Any]], figs: dict[Key, dict[int, dict[str, Any]]], order: str,
                stored_top: int) -> None:
    """Every item's figures equal numpy's for the form it names."""
    for it in items:
        f = figs[(it["layer"], it["neuron"])][it["token_id"]]
        assert it["logit"] == pytest.approx(f["logit"], rel=1e-5, abs=1e-6)
        assert it["cosine"] == pytest.approx(f["cosine"], rel=1e-5, abs=1e-6)
        assert it["value_norm"] == pytest.approx(f["value_norm"], rel=1e-5)
        if order == "rank" or f["rank"] <= stored_top:
            assert it["rank"] == f["rank"], it
        else:
            assert it["rank"] is None, it  # beyond the stored top tokens, not computed for this order
        assert it["coefficient"] == pytest.approx(f["coefficient"])
        assert it["effect"] == pytest.approx(f["effect"], rel=1e-5, abs=1e-6)


FORMS = ["cat", " cat", "house", "id:1"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("projection", ["raw", "folded"])
def test_each_order_equals_numpy(api: httpx.Client, ref: Ref, order: str, projection: str) -> None:
    assert all(c is not None for c in ref.coef.values())  # a corpus run: every neuron has a coefficient
    seen_beyond = False
    for given in FORMS:
        ids = [1] if given == "id:1" else ref.ids(given.strip()) if given[0] != " " else \
            [i for i in ref.ids(given.strip()) if ref.decoded(i).startswith(" ")]
        for k, lo, hi in ((10, None, None), (ref.n_layers * ref.d_mlp, None, None), (7, 1, 1), (30, 1, 2)):
            layers = range(lo or 0, (ref.n_layers - 1 if hi is None else hi) + 1)
            figs = ref.figures(ids, projection, layers)
            want = expected(figs, order)[:k]
            params = {"k": k, "order": order, "projection": projection} | \
                ({"layer_min": lo} if lo is not None else {}) | ({"layer_max": hi} if hi is not None else {})
            body = ranking(api, ref, given, **params)
            assert body["order"] == order
            assert "token" not in body
            assert body["resolved_tokens"]["token"]["token_ids"] == sorted(ids)
            assert body["resolved_tokens"]["token"]["tokens"] == [ref.decoded(i) for i in sorted(ids)]
            assert body["method"] == "exact" and body["complete"] is True
            assert body["stored_top_tokens"] == STORED_TOP
            assert [((it["layer"], it["neuron"]), it["token_id"]) for it in body["items"]] == want, (given, k, lo, hi)
            check_items(body["items"], figs, order, STORED_TOP)
            seen_beyond |= any(it["rank"] is not None and it["rank"] > STORED_TOP for it in body["items"])
            if order == "rank":
                ranks = [it["rank"] for it in body["items"]]
                assert ranks == sorted(ranks)
    if order == "rank":
        assert seen_beyond, "no rank beyond the stored top tokens was returned: the vocabulary path went untested"


def test_orders_differ(api: httpx.Client, ref: Ref) -> None:
    """The orders answer different questions on this model (otherwise the tests above prove little)."""
    tops = {o: [(it["layer"], it["neuron"]) for it in ranking(api, ref, "cat", k=10, order=o)["items"]]
            for o in ORDERS}
    assert len({tuple(v) for v in tops.values()}) == len(ORDERS), tops


def test_default_order_is_logit(api: httpx.Client, ref: Ref) -> None:
    body = ranking(api, ref, "cat", k=5)
    assert body["order"] == "logit"
    assert body["items"] == ranking(api, ref, "cat", k=5, order="logit")["items"]


def test_rank_beyond_the_stored_tokens_from_candidates(api: httpx.Client, ref: Ref,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the stored lists, with no budget to rank every neuron, only cosine candidates are ranked:
    every returned rank is still exact, the neurons with rank <= stored_top all come first, and
    `complete` says whether the set is provably the best."""
    ids = ref.ids("cat")
    figs = ref.figures(ids, "raw", range(ref.n_layers))
    want = expected(figs, "rank")
    within = [w for w in want if figs[w[0]][w[1]]["rank"] <= STORED_TOP]
    assert 0 < len(within) < len(want) - 5
    monkeypatch.setattr(settings, "rank_exact_max_logits", 0)
    monkeypatch.setattr(settings, "rank_candidates", 1)
    k = len(within) + 2  # two beyond the stored lists: 4 candidates (2x) are ranked
    body = ranking(api, ref, "cat", k=k, order="rank")
    got = [((it["layer"], it["neuron"]), it["token_id"]) for it in body["items"]]
    assert got[:len(within)] == within
    assert len(got) == k and len(set(got)) == k
    check_items(body["items"], figs, "rank", STORED_TOP)
    assert [(it["rank"], -it["cosine"]) for it in body["items"]] == sorted((it["rank"], -it["cosine"])
                                                                          for it in body["items"])
    assert body["complete"] is False and body["method"] == "exact"
    # the candidates are the nearest values by cosine (numpy's), so the two chosen are among them
    cos_order = sorted((k_ for k_ in figs if k_ not in {w[0] for w in within}),
                       key=lambda k_: (-max(figs[k_][t]["cosine"] for t in ids), k_))
    assert {g[0] for g in got[len(within):]} <= set(cos_order[:2 * 2 + len(within)])
    # when stored lists fill k, the answer is complete whatever the budget
    body = ranking(api, ref, "cat", k=len(within), order="rank")
    assert body["complete"] is True
    assert [((it["layer"], it["neuron"]), it["token_id"]) for it in body["items"]] == within
    # enough candidates for every neuron: complete and equal to numpy's whole order
    monkeypatch.setattr(settings, "rank_candidates", ref.n_layers * ref.d_mlp)
    body = ranking(api, ref, "cat", k=ref.n_layers * ref.d_mlp, order="rank")
    assert body["complete"] is True
    assert [((it["layer"], it["neuron"]), it["token_id"]) for it in body["items"]] == want


@pytest.mark.parametrize("order", ORDERS)
def test_the_scan_path_equals_numpy(api: httpx.Client, ref: Ref, order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the stored lists (a run from before part 10, or an answer beyond them) every order scans,
    exactly; rank takes its candidates from the cosine scan."""
    monkeypatch.setattr(vectors, "in_range", lambda *a, **kw: None)
    monkeypatch.setattr(settings, "rank_exact_max_logits", 0)
    ids = ref.ids("cat")
    figs = ref.figures(ids, "raw", range(ref.n_layers))
    within = [w for w in expected(figs, "rank") if figs[w[0]][w[1]]["rank"] <= STORED_TOP]
    k = len(within) + 5 if order == "rank" else 20  # rank: five past the stored lists
    want = expected(figs, order)[:k]
    body = ranking(api, ref, "cat", k=k, order=order)
    assert body["order"] == order
    check_items(body["items"], figs, order, STORED_TOP)
    got = [((it["layer"], it["neuron"]), it["token_id"]) for it in body["items"]]
    assert len(got) == k and len(set(got)) == k
    # rank: rank_candidates (200) exceeds this model's 72 neurons, so every neuron beyond the stored
    # top tokens was ranked: complete, and numpy's order exactly
    assert body["method"] == "exact" and body["complete"] is True and got == want


def test_effect_needs_corpus_figures(api: httpx.Client, engine: Engine, tmp_path: Path) -> None:
    directory = api_server.save_gpt2_with_biases(tmp_path / "gpt2", seed=1, bias_seed=2)
    name = f"orders-weights-{TAG}"
    extract(ExtractRequest(model=str(directory), name=name), engine=engine)
    try:
        r = api.get(f"/models/{name}/tokens/cat/neurons", params={"order": "effect"})
        assert r.status_code == 409 and "corpus" in r.json()["detail"], r.text
        for order in ("logit", "rank", "cosine"):  # the others need only weights
            body = ok(api.get(f"/models/{name}/tokens/cat/neurons", params={"order": order, "k": 3}))
            assert body["order"] == order and len(body["items"]) == 3
            assert all(it["coefficient"] is None and it["effect"] is None for it in body["items"])
    finally:
        api_server.drop_catalog(engine, name)


def test_errors_and_openapi(api: httpx.Client, ref: Ref, server: str) -> None:
    r = api.get(f"/models/{ref.name}/tokens/cat/neurons", params={"order": "norm"})
    assert r.status_code == 422 and "order" in r.text
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    op = spec["paths"]["/api/v1/models/{model}/tokens/{token}/neurons"]["get"]
    param = next(p for p in op["parameters"] if p["name"] == "order")
    schema = param["schema"]
    assert set(schema.get("enum", [])) == set(ORDERS) and schema.get("default") == "logit"
    assert all(f"{o}:" in param["description"] for o in ORDERS)
    ranking_schema = spec["components"]["schemas"]["TokenRanking"]["properties"]
    assert {"resolved_tokens", "order", "method", "complete", "stored_top_tokens"} <= set(ranking_schema)
    assert "token" not in ranking_schema
    assert all(f"{o}:" in ranking_schema["order"]["description"] for o in ORDERS)
