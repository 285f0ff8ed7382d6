"""Exact similar-neuron lists (part 10) against brute force in numpy over the same float32 vectors.

The lists (catalog/extract/neighbours.py) and the API's answers from them (catalog/read/vectors.py)
must equal numpy's order in float64, ties broken by (layer, neuron), for any layer range: from the
list when it holds the answer, by an exact scan when it does not.
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
from catalog.extract.neighbours import similar_lists
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


@pytest.mark.parametrize(("n", "d", "keep", "candidates"), [(300, 24, 20, 32), (40, 8, 50, 64), (2, 4, 5, 8)])
def test_lists_are_the_head_of_the_exact_order(n: int, d: int, keep: int, candidates: int) -> None:
    g = torch.Generator().manual_seed(n)
    V = (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)).float()
    lists = similar_lists(V, keep=keep, candidates=candidates, block=64)
    for i in range(n):
        ids, cos = lists.row(i)
        want = brute_force(V.numpy(), i)
        assert len(ids) >= min(keep, n - 1) - 2  # only float32 near-ties at the cut may shorten a list
        assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]]
        np.testing.assert_allclose(cos, [c for _, c in want[:len(ids)]], rtol=0, atol=1e-12)


def test_ties_are_broken_by_id() -> None:
    """Duplicated vectors tie exactly: the lower flat id (layer, neuron) comes first."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 12, generator=g)
    V = torch.cat([base, base[:10], 2 * base[:10]])  # rows 30-39 and 40-49 tie with rows 0-9
    lists = similar_lists(V, keep=10, candidates=16)
    for i in range(len(V)):
        ids, _ = lists.row(i)
        want = brute_force(V.numpy(), i)
        assert [int(j) for j in ids] == [j for j, _ in want[:len(ids)]]
    twin, _ = lists.row(0)
    assert [int(j) for j in twin[:2]] == [30, 40]  # cosine 1 twice: by id


@pytest.fixture(scope="module")
def short_lists(migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two tiny catalogs whose lists hold only 5 neurons, so that ranges and k beyond them scan."""
    root = tmp_path_factory.mktemp("neighbours")
    names = []
    for family in ("gpt2", "llama"):
        model = tiny_models.save(family, root / family, seed=4)
        name = f"neighbours-{family}"
        old = settings.similar_list_size
        settings.similar_list_size = 5
        try:
            extract(ExtractRequest(model=str(model), name=name, params=default_parameters()))
        finally:
            settings.similar_list_size = old
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
