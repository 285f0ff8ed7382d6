"""Search structures derived from a run's rows, built inside the run's publishing transaction.

- ``neuron_search`` rows: per neuron, the lexemes and tokens of its positive trigger prefixes.
- Per-run HNSW indexes over the value vectors (pgvector) for token ranking: cosine and inner product
  (v_i . e_token). (Similar neurons read exact lists, ``similar_lists``, since part 10.) The vector columns have no fixed
  dimension (one table holds every model), so each index is a partial expression index on
  ``run_id = N`` with a cast to ``halfvec(d_model)``: half precision halves the index (a 1,600-dim
  element is 3.2 kB instead of 6.4 kB) and lifts the 2,000-dimension limit of ``vector`` to
  4,000; results are re-ranked with the full-precision vectors, so scores are exact.

Queries must name the run as a literal (``run_id = 17``), not a bind parameter, for the planner to
match a partial index under a generic plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Engine, text

from catalog.store.models import TEXT_SEARCH_CONFIG

Space = Literal["key", "value"]
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
# Enough for the graph of a GPT-2-XL-sized run (307,200 x 1,600 halfvec) to be built in memory.
BUILD_MAINTENANCE_WORK_MEM = "2GB"
MAX_HNSW_DIM = 4000

# (name part, column, operator class): the indexes every run gets. Similar neurons read exact lists
# (similar_lists) since part 10; these two serve token ranking (value_cos its cosine order).
VECTOR_INDEXES: tuple[tuple[str, str, str], ...] = (
    ("value_cos", "value_vector", "halfvec_cosine_ops"),
    ("value_ip", "value_vector", "halfvec_ip_ops"),
)

NEURON_SEARCH_SQL = f"""
INSERT INTO neuron_search (run_id, layer, neuron, terms, trigger_tokens, next_tokens)
SELECT t.run_id, t.layer, t.neuron,
       -- a newline between prefixes: no word runs from one prefix into the next
       strip(to_tsvector('{TEXT_SEARCH_CONFIG}', string_agg(p.text, E'\\n'))),
       array_agg(DISTINCT p.token_id),
       coalesce(array_agg(DISTINCT p.next_token_id) FILTER (WHERE p.next_token_id IS NOT NULL), '{{}}')
FROM triggers t
JOIN prefixes p ON p.run_id = t.run_id AND p.document = t.document AND p.position = t.position
WHERE t.run_id = %(run)s AND t.layer = %(layer)s AND t.sign = 1
GROUP BY t.run_id, t.layer, t.neuron
"""


def vector_index_name(run_id: int, part: str) -> str:
    return f"ix_neurons_hnsw_{part}_run_{int(run_id)}"


def vector_expression(column: str, dim: int) -> str:
    """The indexed expression; a query must spell it the same way to use the index."""
    return f"({column}::halfvec({int(dim)}))"


def build_neuron_search(cur: Any, run_id: int, layer: int) -> int:
    """Fill ``neuron_search`` for one layer from its triggers (already written); returns rows written.

    The run's rows are not committed yet, so the planner's statistics (from the last ANALYZE, after
    the previous run) put about one row under this run id and choose a nested loop over triggers x
    prefixes: quadratic, over six minutes a layer for a second model's 77k triggers. A hash join is
    right for this bulk join whatever the statistics say.
    """
    cur.execute("SET LOCAL enable_nestloop = off")
    try:
        cur.execute(NEURON_SEARCH_SQL, {"run": run_id, "layer": layer})
        return int(cur.rowcount)
    finally:
        cur.execute("SET LOCAL enable_nestloop = on")


def create_vector_indexes(cur: Any, run_id: int, dim: int, on_index: Callable[[], None] | None = None) -> dict[str, float]:
    """Build the run's HNSW indexes; returns seconds per index. Runs in the caller's transaction.
    ``on_index`` is called after each index (a progress bar's tick)."""
    import time

    if dim > MAX_HNSW_DIM:
        return {}  # no index: similar neurons and token ranking answer 409 for such a model
    cur.execute(f"SET LOCAL maintenance_work_mem = '{BUILD_MAINTENANCE_WORK_MEM}'")
    seconds = {}
    for part, column, ops in VECTOR_INDEXES:
        t0 = time.perf_counter()
        cur.execute(
            f"CREATE INDEX IF NOT EXISTS {vector_index_name(run_id, part)} ON neurons USING hnsw "
            f"({vector_expression(column, dim)} {ops}) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) "
            f"WHERE run_id = {int(run_id)}"
        )
        seconds[f"index_{part}"] = time.perf_counter() - t0
        if on_index is not None:
            on_index()
    return seconds


def drop_orphan_vector_indexes(engine: Engine) -> list[str]:
    """Drop the HNSW indexes of runs that no longer exist (a run's rows go by cascade; its indexes stay).

    ``DROP INDEX CONCURRENTLY``, outside any transaction: a plain DROP INDEX would hold an exclusive
    lock on ``neurons`` and stall every search while it waits.
    """
    with engine.connect() as conn:
        names = conn.scalars(text(
            "SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
            "WHERE c.relname LIKE 'ix_neurons_hnsw_%_run_%' "
            "AND substring(c.relname from '_run_([0-9]+)$')::int NOT IN (SELECT id FROM extraction_runs)"
        )).all()
    dropped = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name in names:
            conn.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
            dropped.append(name)
    return dropped


def alembic_include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic autogenerate filter: the per-run HNSW indexes belong to runs, not to the schema."""
    return not (type_ == "index" and name is not None and name.startswith("ix_neurons_hnsw_"))
