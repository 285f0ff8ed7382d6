"""Every weight-derived figure of a tiny model's catalog, checked against the model's own tensors.

Each family's tiny model is extracted once (no corpus) into the real test Postgres; the expected
figures are computed here with numpy from the raw parameters, not with ``catalog.extract``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny_models
import torch
from export_check import assert_export_equals_records
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tiny_models import D_MLP, D_MODEL, FAMILIES, N_LAYERS
from transformers import AutoModelForCausalLM

from catalog.export import export
from catalog.read.catalog import current_run
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store.database import get_engine, session_scope
from catalog.store.models import (
    CatalogModel,
    ExtractionRun,
    Layer,
    Neuron,
    Prefix,
    RunStatus,
    Token,
    Trigger,
    ValueToken,
)

VALUE_TOP, VALUE_BOTTOM = 30, 10
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Extracted:
    family: str
    name: str
    directory: Path
    model: Any  # the model as saved, read back independently of the catalog code
    run_id: int
    engine: Engine


@pytest.fixture(scope="module", params=FAMILIES)
def extracted(
    request: pytest.FixtureRequest, migrated_db: str, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Extracted]:
    family: str = request.param
    directory = tmp_path_factory.mktemp(f"model-{family}") / family
    model: Any = tiny_models.build(family, seed=0)
    # Fresh models have all-zero biases, which would make every bias figure trivial (and every
    # correlation with the bias undefined): give them seeded random values first.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    tiny_models.tokenizer().save_pretrained(directory)
    name = f"weights-{family}-{uuid.uuid4().hex[:8]}"
    engine = get_engine(migrated_db)
    summary = extract(ExtractRequest(model=str(directory), name=name), engine=engine)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    yield Extracted(family, name, directory, model, summary.run_id, engine)
    # The database is shared by the whole session: leave no catalog behind for other modules.
    with session_scope(engine) as s:
        s.execute(delete(CatalogModel).where(CatalogModel.name == name))


@pytest.fixture
def session(extracted: Extracted) -> Any:
    with Session(extracted.engine) as s:
        yield s


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _np_or_none(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else _np(t)


@dataclass
class Expected:
    keys: np.ndarray  # [d_mlp, d_model] float32, as stored in the model
    values: np.ndarray
    bias: np.ndarray | None
    ups: np.ndarray | None


def expected_vectors(model: Any, family: str, layer: int) -> Expected:
    """Keys and values read straight from the parameters, following each family's weight layout."""
    if family == "gpt2":
        mlp = model.transformer.h[layer].mlp
        # Conv1D: y = x @ W + b with W [d_model, d_mlp], so key i is column i; c_proj W is [d_mlp, d_model].
        w_in, w_out = _np(mlp.c_fc.weight), _np(mlp.c_proj.weight)
        assert w_in.shape == (D_MODEL, D_MLP) and w_out.shape == (D_MLP, D_MODEL)
        return Expected(np.ascontiguousarray(w_in.T), w_out, _np_or_none(mlp.c_fc.bias), None)
    if family == "gpt_neox":
        mlp = model.gpt_neox.layers[layer].mlp
        inp, out = mlp.dense_h_to_4h, mlp.dense_4h_to_h
    elif family == "opt":
        block = model.model.decoder.layers[layer]
        inp, out = block.fc1, block.fc2
    elif family == "llama":
        mlp = model.model.layers[layer].mlp
        inp, out = mlp.gate_proj, mlp.down_proj
    else:
        raise AssertionError(family)
    # nn.Linear: y = x @ W.T + b with W [out, in]: key i is row i of the input projection, value i
    # is column i of the output projection.
    w_in, w_out = _np(inp.weight), _np(out.weight)
    assert w_in.shape == (D_MLP, D_MODEL) and w_out.shape == (D_MODEL, D_MLP)
    ups = _np(model.model.layers[layer].mlp.up_proj.weight) if family == "llama" else None
    return Expected(w_in, np.ascontiguousarray(w_out.T), _np_or_none(inp.bias), ups)


def _modules(model: Any, family: str, layer: int) -> tuple[Any, Any]:
    if family == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return mlp.c_fc, mlp.c_proj
    if family == "gpt_neox":
        mlp = model.gpt_neox.layers[layer].mlp
        return mlp.dense_h_to_4h, mlp.dense_4h_to_h
    if family == "opt":
        block = model.model.decoder.layers[layer]
        return block.fc1, block.fc2
    mlp = model.model.layers[layer].mlp
    return mlp.gate_proj, mlp.down_proj


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _mean_offdiagonal_cosine(x: np.ndarray) -> float:
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    c = unit @ unit.T
    n = c.shape[0]
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def _neuron_rows(session: Session, run_id: int, layer: int) -> list[Neuron]:
    return list(session.scalars(
        select(Neuron).where(Neuron.run_id == run_id, Neuron.layer == layer).order_by(Neuron.neuron)
    ))


def _value_tokens(session: Session, run_id: int, layer: int, kind: str,
                  convention: str = "raw") -> dict[int, list[tuple[int, int, float]]]:
    """neuron -> [(rank, token_id, logit)] in rank order."""
    out: dict[int, list[tuple[int, int, float]]] = {}
    for n, rank, tid, logit in session.execute(
        select(ValueToken.neuron, ValueToken.rank, ValueToken.token_id, ValueToken.logit)
        .where(ValueToken.run_id == run_id, ValueToken.layer == layer, ValueToken.kind == kind,
               ValueToken.convention == convention)
        .order_by(ValueToken.neuron, ValueToken.rank)
    ).tuples():
        out.setdefault(n, []).append((rank, tid, logit))
    return out


# --- the expected layout itself -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_layout_matches_the_modules_forward(family: str) -> None:
    """The layouts used below really are keys (pre-activation = x.k_i + b_i) and values (output += m_i v_i)."""
    model: Any = tiny_models.build(family, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(N_LAYERS):
            exp = expected_vectors(model, family, layer)
            inp, out = _modules(model, family, layer)
            x = torch.randn(5, D_MODEL, generator=gen)
            pre = x.numpy().astype(np.float64) @ exp.keys.T.astype(np.float64)
            if exp.bias is not None:
                pre += exp.bias
            np.testing.assert_allclose(inp(x).numpy(), pre, rtol=1e-5, atol=1e-5)
            m = torch.randn(5, D_MLP, generator=gen)
            zero = out(torch.zeros(1, D_MLP)).numpy()  # the output bias, if any
            np.testing.assert_allclose(out(m).numpy() - zero, m.numpy() @ exp.values, rtol=1e-5, atol=1e-5)
            if family == "llama":
                up = model.model.layers[layer].mlp.up_proj
                assert exp.ups is not None
                np.testing.assert_allclose(up(x).numpy(), x.numpy() @ exp.ups.T, rtol=1e-5, atol=1e-5)


# --- per neuron -----------------------------------------------------------------------------


def test_catalog_entry_and_run_row(extracted: Extracted, session: Session) -> None:
    entry = session.scalar(select(CatalogModel).where(CatalogModel.name == extracted.name))
    assert entry is not None
    assert entry.current_run_id == extracted.run_id
    assert entry.family == extracted.family
    assert entry.model_type == extracted.model.config.model_type
    assert (entry.n_layers, entry.d_model, entry.d_mlp) == (N_LAYERS, D_MODEL, D_MLP)
    assert entry.vocab_size == extracted.model.get_output_embeddings().weight.shape[0]
    assert entry.gated is (extracted.family == "llama")
    assert entry.source == str(extracted.directory.resolve())

    run = session.get(ExtractionRun, extracted.run_id)
    assert run is not None
    assert run.status == RunStatus.complete
    assert run.error is None
    assert run.finished_at is not None and run.finished_at >= run.started_at
    assert HEX64.match(run.weights_sha256 or "")
    assert HEX64.match(run.tokenizer_sha256 or "")
    assert run.projection_convention == "raw_unembedding"
    assert run.corpus is None and run.corpus_sha256 is None
    assert run.parameters["value_top"] == VALUE_TOP and run.parameters["value_bottom"] == VALUE_BOTTOM
    for stage in ("load", "weight_statistics", "token_projections", "ingest", "total"):
        assert isinstance(run.timings.get(stage), float) and run.timings[stage] >= 0.0, stage
    assert "corpus_figures" not in run.timings
    assert run.timings["total"] >= run.timings["ingest"]
    assert run.progress["stage"] == "complete"
    # weight-only runs: no corpus rows at all
    for table in (Prefix, Trigger):
        assert session.scalar(select(func.count()).select_from(table).where(table.run_id == run.id)) == 0


def test_tokens_table_holds_the_whole_vocabulary(extracted: Extracted, session: Session) -> None:
    rows = session.execute(
        select(Token.token_id, Token.text).where(Token.run_id == extracted.run_id).order_by(Token.token_id)
    ).tuples().all()
    vocab = tiny_models.SPECIAL + tiny_models.WORDS  # the word-level vocabulary, special tokens first
    assert extracted.model.get_output_embeddings().weight.shape[0] == len(vocab)
    assert rows == list(enumerate(vocab))


def test_neuron_figures(extracted: Extracted, session: Session) -> None:
    gated = extracted.family == "llama"
    for layer in range(N_LAYERS):
        exp = expected_vectors(extracted.model, extracted.family, layer)
        rows = _neuron_rows(session, extracted.run_id, layer)
        assert [r.neuron for r in rows] == list(range(D_MLP))
        k64, v64 = exp.keys.astype(np.float64), exp.values.astype(np.float64)
        np.testing.assert_allclose([r.key_norm for r in rows], np.sqrt((k64**2).sum(1)), rtol=1e-10)
        np.testing.assert_allclose([r.value_norm for r in rows], np.sqrt((v64**2).sum(1)), rtol=1e-10)
        np.testing.assert_allclose([r.alignment for r in rows], _cos_rows(exp.keys, exp.values), rtol=1e-9, atol=1e-12)
        if gated:
            assert exp.bias is None
            assert all(r.bias is None for r in rows)
            assert exp.ups is not None
            np.testing.assert_allclose(np.array([r.up_norm for r in rows], dtype=float), np.linalg.norm(exp.ups.astype(np.float64), axis=1),
                                       rtol=1e-10)
            np.testing.assert_allclose(np.array([r.up_alignment for r in rows], dtype=float), _cos_rows(exp.ups, exp.values),
                                       rtol=1e-9, atol=1e-12)
        else:
            assert exp.bias is not None
            assert [r.bias for r in rows] == [float(b) for b in exp.bias]  # float32 -> float8 exactly
            assert all(r.up_norm is None and r.up_alignment is None for r in rows)
        # corpus figures are null in a weight-only run
        assert all(r.activation_mean is None and r.agreement is None and r.suggested_label is None for r in rows)


def test_vectors_round_trip_through_pgvector(extracted: Extracted, session: Session) -> None:
    for layer in range(N_LAYERS):
        exp = expected_vectors(extracted.model, extracted.family, layer)
        rows = _neuron_rows(session, extracted.run_id, layer)
        # float4 in pgvector: the model's float32 values come back exactly
        keys = np.array([r.key_vector for r in rows], dtype=np.float64)
        values = np.array([r.value_vector for r in rows], dtype=np.float64)
        assert keys.shape == values.shape == (D_MLP, D_MODEL)
        np.testing.assert_array_equal(keys, exp.keys.astype(np.float64))
        np.testing.assert_array_equal(values, exp.values.astype(np.float64))
        if exp.ups is not None:
            ups = np.array([r.up_vector for r in rows], dtype=np.float64)
            np.testing.assert_array_equal(ups, exp.ups.astype(np.float64))
        else:
            assert all(r.up_vector is None for r in rows)


@pytest.mark.parametrize("convention", ["raw", "folded"])
def test_value_tokens_are_the_extremes_of_v_times_E(extracted: Extracted, session: Session, convention: str) -> None:
    # raw: E as stored; folded: E with the final norm's gain g multiplied into its columns
    emb = _np(extracted.model.get_output_embeddings().weight).astype(np.float64)
    if convention == "folded":
        gain = _np(extracted.model.state_dict()[tiny_models.FINAL_NORM[extracted.family]]).astype(np.float64)
        assert np.abs(gain - 1).max() > 0.1  # tiny_models randomises it: the two conventions differ
        emb = emb * gain
    vocab = emb.shape[0]
    n_top, n_bottom = min(VALUE_TOP, vocab), min(VALUE_BOTTOM, vocab)
    for layer in range(N_LAYERS):
        exp = expected_vectors(extracted.model, extracted.family, layer)
        logits = exp.values.astype(np.float64) @ emb.T  # [d_mlp, vocab]
        tol = 1e-5 * float(np.abs(logits).max())  # the pipeline multiplies in float32
        top = _value_tokens(session, extracted.run_id, layer, "top", convention)
        bottom = _value_tokens(session, extracted.run_id, layer, "bottom", convention)
        assert sorted(top) == list(range(D_MLP)) and sorted(bottom) == list(range(D_MLP))
        for i in range(D_MLP):
            for rows, n, descending in ((top[i], n_top, True), (bottom[i], n_bottom, False)):
                assert [r for r, _, _ in rows] == list(range(n))
                ids = [t for _, t, _ in rows]
                stored = np.array([lg for _, _, lg in rows])
                assert len(set(ids)) == n and all(0 <= t < vocab for t in ids)
                # each stored logit is that token's logit ...
                np.testing.assert_allclose(stored, logits[i, ids], rtol=0, atol=tol)
                # ... and together they are the n most extreme logits, in order
                ordered = np.sort(logits[i])[::-1] if descending else np.sort(logits[i])
                np.testing.assert_allclose(stored, ordered[:n], rtol=0, atol=tol)
                assert np.all(np.diff(stored) <= 0) if descending else np.all(np.diff(stored) >= 0)


# --- per layer ------------------------------------------------------------------------------


def test_layer_statistics(extracted: Extracted, session: Session) -> None:
    layers = list(session.scalars(select(Layer).where(Layer.run_id == extracted.run_id).order_by(Layer.layer)))
    assert [x.layer for x in layers] == list(range(N_LAYERS))
    for row in layers:
        exp = expected_vectors(extracted.model, extracted.family, row.layer)
        k64, v64 = exp.keys.astype(np.float64), exp.values.astype(np.float64)
        key_norm, value_norm = np.linalg.norm(k64, axis=1), np.linalg.norm(v64, axis=1)
        alignment = _cos_rows(exp.keys, exp.values)
        assert row.mean_alignment == pytest.approx(alignment.mean(), rel=1e-9, abs=1e-12)
        assert row.key_cosine_mean == pytest.approx(_mean_offdiagonal_cosine(exp.keys), rel=1e-9, abs=1e-12)
        assert row.value_cosine_mean == pytest.approx(_mean_offdiagonal_cosine(exp.values), rel=1e-9, abs=1e-12)
        stats: dict[str, np.ndarray] = {"key_norm": key_norm, "value_norm": value_norm, "alignment": alignment}
        if exp.bias is None:
            assert row.mean_bias is None
            assert row.corr_bias_key_norm is None and row.corr_bias_value_norm is None
            assert row.corr_bias_alignment is None
            assert row.bias_alignment_slope is None and row.bias_alignment_intercept is None
            assert exp.ups is not None
            stats["up_alignment"] = _cos_rows(exp.ups, exp.values)
        else:
            bias = exp.bias.astype(np.float64)
            stats["bias"] = bias
            assert row.mean_bias == pytest.approx(bias.mean(), rel=1e-9, abs=1e-12)
            assert row.corr_bias_key_norm == pytest.approx(np.corrcoef(bias, key_norm)[0, 1], rel=1e-8)
            assert row.corr_bias_value_norm == pytest.approx(np.corrcoef(bias, value_norm)[0, 1], rel=1e-8)
            assert row.corr_bias_alignment == pytest.approx(np.corrcoef(bias, alignment)[0, 1], rel=1e-8)
            slope, intercept = np.polyfit(alignment, bias, 1)
            assert row.bias_alignment_slope == pytest.approx(slope, rel=1e-8)
            assert row.bias_alignment_intercept == pytest.approx(intercept, rel=1e-8, abs=1e-12)
        # weight-only run: no corpus means
        assert row.mean_agreement is None and row.mean_ablation_last is None

        assert set(row.histograms) == set(stats)
        for stat, values in stats.items():
            hist = row.histograms[stat]
            edges, counts = np.array(hist["edges"]), hist["counts"]
            assert len(edges) == len(counts) + 1 and len(counts) > 1
            assert sum(counts) == D_MLP
            assert np.all(np.diff(edges) > 0)
            assert edges[0] == pytest.approx(values.min(), rel=1e-9) and edges[-1] == pytest.approx(values.max(), rel=1e-9)
            # clip: the extremes computed here may differ from the stored edges in the last bit
            assert counts == np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].tolist(), stat


def test_row_counts(extracted: Extracted, session: Session) -> None:
    rid = extracted.run_id
    vocab = extracted.model.get_output_embeddings().weight.shape[0]

    def count(table: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(table).where(table.run_id == rid)) or 0)

    assert count(Neuron) == N_LAYERS * D_MLP
    # both projection conventions, raw and folded
    assert count(ValueToken) == 2 * N_LAYERS * D_MLP * (min(VALUE_TOP, vocab) + min(VALUE_BOTTOM, vocab))
    assert count(Layer) == N_LAYERS
    assert count(Token) == vocab


# --- export ---------------------------------------------------------------------------------


def _db_truth(session: Session, name: str) -> dict[tuple[int, int], dict[str, Any]]:
    found = current_run(session, name)
    assert found is not None
    rid = found[1].id
    texts = dict(session.execute(select(Token.token_id, Token.text).where(Token.run_id == rid)).tuples().all())
    truth: dict[tuple[int, int], dict[str, Any]] = {}
    for r in session.scalars(select(Neuron).where(Neuron.run_id == rid)):
        truth[(r.layer, r.neuron)] = {
            "model": name, "layer": r.layer, "neuron": r.neuron, "key_norm": r.key_norm, "value_norm": r.value_norm,
            "bias": r.bias, "alignment": r.alignment, "value_top_tokens": [], "value_bottom_tokens": [],
            "value_top_tokens_folded": [], "value_bottom_tokens_folded": [],
            "key_vector": [float(x) for x in r.key_vector], "value_vector": [float(x) for x in r.value_vector],
        }
    for layer, n, conv, kind, tid, logit in session.execute(
        select(ValueToken.layer, ValueToken.neuron, ValueToken.convention, ValueToken.kind, ValueToken.token_id,
               ValueToken.logit)
        .where(ValueToken.run_id == rid).order_by(ValueToken.layer, ValueToken.neuron, ValueToken.kind, ValueToken.rank)
    ).tuples():
        suffix = "" if conv == "raw" else "_folded"
        truth[(layer, n)][f"value_{kind}_tokens{suffix}"].append({"token_id": tid, "token": texts[tid], "logit": logit})
    return truth


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_records_equal_the_database(extracted: Extracted, session: Session, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"catalog{suffix}"
    vectors = suffix == ".jsonl"  # one format with the optional vectors
    with Session(extracted.engine) as s:
        written = export(s, extracted.name, out, vectors=vectors)
    assert written == N_LAYERS * D_MLP
    assert not list(tmp_path.glob("*.partial"))
    if suffix == ".jsonl":
        recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        recs = pq.read_table(out).to_pylist()
    assert len(recs) == written
    assert [(r["layer"], r["neuron"]) for r in recs] == [(x, n) for x in range(N_LAYERS) for n in range(D_MLP)]
    truth = _db_truth(session, extracted.name)
    fields = ["model", "layer", "neuron", "key_norm", "value_norm", "bias", "alignment",
              "value_top_tokens", "value_bottom_tokens", "value_top_tokens_folded", "value_bottom_tokens_folded"]
    if vectors:
        fields += ["key_vector", "value_vector"]
    for rec in recs:
        want = truth[(rec["layer"], rec["neuron"])]
        for f in fields:
            assert rec[f] == want[f], (rec["layer"], rec["neuron"], f)
        top = rec["value_top_tokens"]
        assert len(top) == min(VALUE_TOP, extracted.model.get_output_embeddings().weight.shape[0])
        assert [set(t) for t in top] == [{"token_id", "token", "logit"}] * len(top)
        logits = [t["logit"] for t in top]
        assert logits == sorted(logits, reverse=True)  # highest first
        assert rec["value_bottom_tokens"][0]["logit"] <= logits[-1]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_with_vectors_writes_the_records(extracted: Extracted, tmp_path: Path, suffix: str) -> None:
    """With --vectors (and up vectors where the model is gated) the files are records() too."""
    with Session(extracted.engine) as s:
        assert_export_equals_records(s, extracted.name, tmp_path / f"out{suffix}", vectors=True)
