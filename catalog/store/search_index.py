"""Search structures derived from a run's rows, built inside the run's publishing transaction.

- ``neuron_search`` rows: per neuron, the lexemes and tokens of its positive trigger prefixes.
- (Until part 10, per-run HNSW indexes over the vectors; exact lists replaced them, see
  catalog/extract/neighbours.py; revision 0010 drops them.)
"""

from __future__ import annotations

from typing import Any

from catalog.store.models import TEXT_SEARCH_CONFIG

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


def alembic_include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic autogenerate filter: per-run HNSW indexes (before revision 0010) belonged to runs, not to
    the schema."""
    return not (type_ == "index" and name is not None and name.startswith("ix_neurons_hnsw_"))
