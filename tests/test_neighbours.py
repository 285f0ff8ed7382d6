"""Exact neighbour lists (part 10) against brute force in numpy over the same float32 vectors.

The lists (catalog/extract/neighbours.py) and the API's answers from them (catalog/read/vectors.py)
must equal numpy's order in float64, ties broken by (layer, neuron), for any layer range: from the
list when it holds the answer, by an exact scan when it does not. Scores: float32's precision
(float64 where near-ties were re-scored), so within 1e-6 relative.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tiny_models
import torch
from sqlalchemy import text
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.extract.neighbours import TokenLists, exact_order, similar_lists
from catalog.read import vectors
from catalog.read.catalog import require_run
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import get_engine


def brute_force(V: np.ndarray, i: int, rows: list[int] | None = None) -> list[tuple[int, float]]:
    """(row, cosine) of every other row, best first, ties by row: numpy in float64."""
    V64 = V.astype(np.float64)
    unit = V64 / np.linalg.norm(V64, axis=1, keepdims=True)
    cos = unit @ unit[i]
    cand = [j for j in (range(len(V)) if rows is None else rows) if j != i]
    return sorted(((j, float(cos[j])) for j in cand), key=lambda p: (-p[1], p[0]))


# blocks of the Gram matrix larger and smaller than the candidates kept, a last block of another size
@pytest.mark.parametrize(("n", "d", "keep", "candidates", "block"),
                         [(300, 24, 20, 32, 64), (300, 24, 20, 32, 7), (40, 8, 50, 64, 64), (40, 8, 50, 64, 9),
                          (2, 4, 5, 8, 64), (2, 4, 5, 8, 1)])
def test_lists_are_the_head_of_the_exact_order(n: int, d: int, keep: int, candidates: int, block: int) -> None:
    g = torch.Generator().manual_seed(n)
    V = (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)).float()
    lists = similar_lists(V, keep=keep, candidates=candidates, block=block)
    for i in range(n):
        ids, cos = lists.row(i)
        want = brute_force(V.numpy(), i)
        assert len(ids) >= min(keep, n - 1) - 2  # only float32 near-ties at the cut may shorten a list
        assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]]
        np.testing.assert_allclose(cos, [c for _, c in want[:len(ids)]], rtol=0, atol=1e-6)


def test_lists_of_chosen_rows_are_those_rows_lists() -> None:
    """``rows=``: a sample (or block) of neurons listed against every row, as numpy orders them."""
    g = torch.Generator().manual_seed(11)
    V = (torch.randn(200, 16, generator=g) * torch.rand(200, 1, generator=g)).float()
    rows = np.array([150, 3, 77, 199, 0])
    lists = similar_lists(V, keep=20, candidates=32, block=2, rows=rows)
    assert len(lists.length) == len(rows)
    for r, i in enumerate(rows):
        ids, cos = lists.row(r)
        want = brute_force(V.numpy(), int(i))
        assert len(ids) >= 18
        assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]]
        np.testing.assert_allclose(cos, [c for _, c in want[:len(ids)]], rtol=0, atol=1e-6)


def test_ties_are_broken_by_id() -> None:
    """Duplicated vectors tie exactly: the lower flat id (layer, neuron) comes first."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 12, generator=g)
    V = torch.cat([base, base[:10], 2 * base[:10]])  # rows 30-39 and 40-49 tie with rows 0-9
    for block in (None, 4):  # in one product, and across blocks (ties met at a row's running cut)
        lists = similar_lists(V, keep=10, candidates=16, block=block)
        for i in range(len(V)):
            ids, _ = lists.row(i)
            want = brute_force(V.numpy(), i)
            assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]]
        twin, _ = lists.row(0)
        assert [int(j) for j in twin[:2]] == [30, 40]  # cosine 1 twice: by id


def token_brute_force(V: np.ndarray, E: np.ndarray, t: int, order: str, rows: list[int] | None = None
                      ) -> list[tuple[int, float]]:
    """(neuron, score) by logit v . e_t or cosine, best first, ties by neuron: numpy in float64."""
    V64, e = V.astype(np.float64), E[t].astype(np.float64)
    s = V64 @ e
    if order == "cosine":
        s = s / np.linalg.norm(V64, axis=1) / np.linalg.norm(e)
    cand = range(len(V)) if rows is None else rows
    return sorted(((j, float(s[j])) for j in cand), key=lambda p: (-p[1], p[0]))


@pytest.mark.parametrize(("layers", "d_mlp", "d", "vocab", "keep"), [(4, 48, 16, 200, 20), (2, 5, 8, 30, 50)])
def test_token_lists_are_the_head_of_the_exact_order(layers: int, d_mlp: int, d: int, vocab: int, keep: int) -> None:
    """Fed layer by layer as the projection stage does, raw and folded; later layers' values grow (as
    in real models) so that the lists change hands between layers."""
    g = torch.Generator().manual_seed(d_mlp)
    values = [torch.randn(d_mlp, d, generator=g) * torch.rand(d_mlp, 1, generator=g) * (1 + i) for i in range(layers)]
    values[1][:3] = values[0][:3]  # exact ties across layers: the lower layer first
    E = torch.randn(vocab, d, generator=g)
    gain = torch.rand(d, generator=g) + 0.5
    lists = TokenLists(E, gain, d_mlp, keep=keep, candidates=keep + 8)
    for i, v in enumerate(values):
        lists.add(i, v, v @ E.T, v @ (E * gain).T)
    out = lists.finish()
    assert set(out) == {(c, o) for c in ("raw", "folded") for o in ("logit", "cosine")}
    V = torch.cat(values).numpy()
    folded = E.double().numpy() * gain.double().numpy()
    for (convention, order), ranked in out.items():
        EE = E.numpy() if convention == "raw" else folded
        for t in range(vocab):
            ids, scores = ranked.row(t)
            want = token_brute_force(V, EE, t, order)
            assert len(ids) >= min(keep, len(V)) - 2
            assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]], (convention, order, t)
            np.testing.assert_allclose(scores, [s for _, s in want[:len(ids)]], rtol=1e-6, atol=1e-6)


def test_exact_order_rescores_near_ties_and_cuts_what_it_cannot_vouch_for() -> None:
    """float32 scores 1e-9 apart are re-scored (here the float64 order reverses them); the list stops
    before an entry that a left-out neuron (last) may beat."""
    ids = np.array([[7, 3, 5, 9]], dtype=np.int32)
    s32 = np.array([[2.0, 1.0 + 1e-9, 1.0, 0.5]], dtype=np.float32)
    truth = {7: 2.0, 3: 0.9999, 5: 1.0001, 9: 0.5}
    asked: list[int] = []

    def dot64(r: np.ndarray, i: np.ndarray) -> np.ndarray:
        asked.extend(int(x) for x in i)
        return np.array([truth[int(x)] for x in i])

    out = exact_order(ids, s32, np.full((1, 4), 5e-4), last=np.array([0.6], np.float32), delta_out=np.array([1e-3]),
                      keep=10, dot64=dot64)
    assert sorted(asked) == [3, 5]  # only the near-tie
    got, scores = out.row(0)
    assert got.tolist() == [7, 5, 3]  # 9 (0.5) is below last + 2 delta: a left-out neuron may beat it
    assert scores.tolist() == [2.0, 1.0001, 0.9999]


@pytest.fixture(scope="module")
def short_lists(migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two tiny catalogs whose lists hold only 5 neurons, so that ranges and k beyond them scan."""
    root = tmp_path_factory.mktemp("neighbours")
    names = []
    for family in ("gpt2", "llama"):
        model = tiny_models.save(family, root / family, seed=4)
        name = f"neighbours-{family}"
        old = settings.neighbour_list_size
        settings.neighbour_list_size = 5
        try:
            extract(ExtractRequest(model=str(model), name=name, params=default_parameters()))
        finally:
            settings.neighbour_list_size = old
        names.append(name)
    yield names[0], names[1]


def _stored(name: str, space: str) -> tuple[np.ndarray, int, int, int]:
    """The run's vectors as the catalog stores them [layers * d_mlp, d_model], its run id and shape."""
    with Session(bind=get_engine()) as s:
        entry, run = require_run(s, name)
        rows = s.execute(text(f"SELECT {space}_vector FROM neurons WHERE run_id = :r ORDER BY layer, neuron"),
                         {"r": run.id}).scalars().all()
    return np.stack([np.asarray(v.to_numpy(), dtype=np.float32) for v in rows]), int(run.id), \
        int(entry.n_layers), int(entry.d_mlp)


@pytest.mark.parametrize("space", ["key", "value"])
def test_every_range_and_k_is_exact(short_lists: tuple[str, str], space: str) -> None:
    for name in short_lists:
        V, rid, n_layers, d_mlp = _stored(name, space)
        with Session(bind=get_engine()) as s:
            stored = s.execute(text("SELECT count(*), max(cardinality(ids)) FROM similar_lists WHERE run_id = :r "
                                    "AND space = :s"), {"r": rid, "s": space}).one()
        assert tuple(stored) == (n_layers * d_mlp, 5)
        for layer, neuron in ((0, 0), (0, 7), (n_layers - 1, d_mlp - 1)):
            i = layer * d_mlp + neuron
            for lo, hi in ((0, n_layers - 1), (0, 0), (n_layers - 1, n_layers - 1)):
                rows = list(range(lo * d_mlp, (hi + 1) * d_mlp))
                want = brute_force(V, i, rows)
                for k in (1, 3, 5, 6, 20, len(want)):  # within the list, beyond it, every neuron in range
                    with Session(bind=get_engine()) as s:
                        page = vectors.similar(s, name, layer, neuron, space=space, k=k, layer_min=lo, layer_max=hi)
                    got = [(it.layer * d_mlp + it.neuron) for it in page.items]
                    assert got == [j for j, _ in want[:k]], (name, space, layer, neuron, lo, hi, k)
                    assert page.method == "exact"
                    # the list's float64 cosines, or pgvector's float32 ones on a scan
                    np.testing.assert_allclose([it.cosine for it in page.items], [c for _, c in want[:k]],
                                               rtol=0, atol=2e-6)


def test_a_run_without_lists_scans(short_lists: tuple[str, str]) -> None:
    """Runs published before part 10 have no lists: the answer is the same, from a scan."""
    name = short_lists[0]
    V, rid, _, d_mlp = _stored(name, "key")
    with Session(bind=get_engine()) as s:
        s.execute(text("DELETE FROM similar_lists WHERE run_id = :r AND layer = 0 AND neuron = 2"), {"r": rid})
        page = vectors.similar(s, name, 0, 2, space="key", k=4)
        s.rollback()
    assert [it.layer * d_mlp + it.neuron for it in page.items] == [j for j, _ in brute_force(V, 2)[:4]]


@pytest.mark.parametrize("projection", ["raw", "folded"])
@pytest.mark.parametrize("order", ["logit", "cosine"])
def test_token_ranking_is_exact_for_every_range_and_k(short_lists: tuple[str, str], order: str, projection: str) -> None:
    for name in short_lists:
        V, rid, n_layers, d_mlp = _stored(name, "value")
        with Session(bind=get_engine()) as s:
            _, run = require_run(s, name)
            E = np.stack([np.asarray(e.to_numpy(), dtype=np.float64) for e in s.execute(text(
                "SELECT unembedding FROM tokens WHERE run_id = :r ORDER BY token_id"), {"r": rid}).scalars()])
            gain = np.asarray(run.final_norm_gain, dtype=np.float64)
            stored = s.execute(text("SELECT count(*), max(cardinality(ids)) FROM token_lists WHERE run_id = :r AND "
                                    "convention = :c AND ranking = :o"), {"r": rid, "c": projection, "o": order}).one()
        assert tuple(stored) == (len(E), 5)
        EE = E * gain if projection == "folded" else E
        for token_id in (5, 8, 20):  # single-token words of tiny_models' vocabulary
            word = tiny_models.tokenizer().convert_ids_to_tokens(token_id)
            for lo, hi in ((0, n_layers - 1), (0, 0), (n_layers - 1, n_layers - 1)):
                want = token_brute_force(V, EE, token_id, order, list(range(lo * d_mlp, (hi + 1) * d_mlp)))
                for k in (1, 5, 6, 20):
                    with Session(bind=get_engine()) as s:
                        page = vectors.token_ranking(s, name, f"id:{token_id}", k=k, layer_min=lo, layer_max=hi,
                                                     projection=projection, order=order)
                    got = [it.layer * d_mlp + it.neuron for it in page.items]
                    assert got == [j for j, _ in want[:k]], (name, word, order, projection, lo, hi, k)
                    assert page.method == "exact" and page.complete
