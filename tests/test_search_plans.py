"""Every kind of search has an index plan: with sequential scans disabled, no statement the read
side sends scans a table (on a tiny catalog the planner would otherwise rightly prefer scans).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from sqlalchemy.orm import Session

from catalog.read import catalog, search, vectors
from catalog.read.explain import plans
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import get_engine

NAME = "plans-gpt2"


@pytest.fixture(scope="module")
def tiny_catalog(migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("plans")
    model = tiny_models.save("gpt2", root / "gpt2")
    rnd = random.Random(5)
    lines = [" ".join(rnd.choice(tiny_models.WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(150)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    extract(ExtractRequest(model=str(model), name=NAME, corpus=str(corpus), params=default_parameters(top_n=8, window=32)))
    yield NAME


S = search.SearchQuery
KINDS: dict[str, Callable[[Session], Any]] = {
    "detail": lambda s: catalog.neuron_record(s, NAME, 1, 3),
    "detail as one JSON statement": lambda s: catalog.neuron_record_json(s, NAME, 1, 3),
    "filter+sort": lambda s: search.search(s, NAME, S(layer_min=1, ranges=(("alignment", "min", 0.0),), sort="-key_norm")),
    "search page as one JSON statement": lambda s: search.search_json(s, NAME, S(layer_min=1, sort="-key_norm")),
    "sort by each direction": lambda s: search.search(s, NAME, S(sort="agreement", limit=5)),
    "pattern word": lambda s: search.search(s, NAME, S(q="cat")),
    "pattern phrase": lambda s: search.search(s, NAME, S(q='"the cat" -dog')),
    "token": lambda s: search.search(s, NAME, S(token="cat")),
    "trigger token": lambda s: search.search(s, NAME, S(trigger_token="cat")),
    "next token": lambda s: search.search(s, NAME, S(next_token="cat")),
    "token ranking (list)": lambda s: vectors.token_ranking(s, NAME, "cat", k=5),
    "token ranking by cosine (list)": lambda s: vectors.token_ranking(s, NAME, "cat", k=5, order="cosine"),
    "token ranking by rank": lambda s: vectors.token_ranking(s, NAME, "cat", k=5, order="rank"),
    "similar (list)": lambda s: vectors.similar(s, NAME, 1, 3, space="key", k=5),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_search_kind_has_an_index_plan(tiny_catalog: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    off = {"enable_seqscan": "off"}
    explained = plans(get_engine(), KINDS[kind], settings=off)
    assert explained, "the call sent no statement worth explaining"
    for statement, plan in explained:
        scans = re.findall(r"Seq Scan on (\w+)", plan)
        assert not scans, f"{kind}: sequential scan of {scans} in\n{statement}\n{plan}"
    if "(list)" in kind:  # one row of the run's exact lists, by its primary key
        assert any(re.search(r"Index Scan using pk_(token|similar)_lists", plan) for _, plan in explained), explained


def test_lists_follow_their_run(tiny_catalog: str) -> None:
    """A re-extraction writes the new run's exact lists; the old run's go with it."""
    from sqlalchemy import text

    def runs_with_lists() -> set[int]:
        with get_engine().connect() as conn:
            return set(conn.scalars(text("SELECT run_id FROM token_lists UNION SELECT run_id FROM similar_lists")))

    with Session(bind=get_engine()) as s:
        found = catalog.current_run(s, NAME)
        assert found is not None
        old = found[1].id
    assert old in runs_with_lists()
    model_dir = Path(found[0].source)
    extract(ExtractRequest(model=str(model_dir), name=NAME, params=default_parameters()))
    with Session(bind=get_engine()) as s:
        new_found = catalog.current_run(s, NAME)
        assert new_found is not None
        new = new_found[1].id
    after = runs_with_lists()
    assert new != old and new in after and old not in after
    with get_engine().connect() as conn:  # and no HNSW index is left on the table (revision 0010)
        assert conn.scalar(text("SELECT count(*) FROM pg_class WHERE relname LIKE 'ix_neurons_hnsw_%'")) == 0
