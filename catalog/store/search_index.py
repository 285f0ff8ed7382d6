"""Search structures derived from a run's rows, built inside the run's publishing transaction.

- ``neuron_search`` rows: per neuron, the lexemes and tokens of its positive trigger prefixes.
- ``neuron_summaries`` rows: per neuron, a search hit's top tokens and strongest trigger as JSON.
- (Until part 10, per-run HNSW indexes over the vectors; exact lists replaced them, see
  catalog/extract/neighbours.py; revision 0010 drops them.)
"""

from __future__ import annotations

from typing import Any

from catalog.store.models import TEXT_SEARCH_CONFIG
from catalog.vocab import SUMMARY_TOKENS

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


# The JSON of a search hit's parts that live in other tables (what catalog/read/search.py showed by
# probing them per hit): the top SUMMARY_TOKENS promoted tokens of each convention, best first, and
# the strongest positive trigger with its next token. Every neuron of the layer gets a row.
NEURON_SUMMARIES_SQL = f"""
INSERT INTO neuron_summaries (run_id, layer, neuron, top_tokens_raw, top_tokens_folded, top_trigger)
SELECT n.run_id, n.layer, n.neuron, coalesce(v.raw, '[]'), coalesce(v.folded, '[]'), tr.top
FROM neurons n
LEFT JOIN (
    SELECT vt.layer, vt.neuron,
           json_agg(json_build_object('token_id', vt.token_id, 'token', t.text, 'logit', vt.logit) ORDER BY vt.rank)
               FILTER (WHERE vt.convention = 'raw') AS raw,
           json_agg(json_build_object('token_id', vt.token_id, 'token', t.text, 'logit', vt.logit) ORDER BY vt.rank)
               FILTER (WHERE vt.convention = 'folded') AS folded
    FROM value_tokens vt JOIN tokens t ON t.run_id = vt.run_id AND t.token_id = vt.token_id
    WHERE vt.run_id = %(run)s AND vt.layer = ANY(%(layers)s) AND vt.kind = 'top' AND vt.rank < {SUMMARY_TOKENS}
    GROUP BY vt.layer, vt.neuron
) v ON v.layer = n.layer AND v.neuron = n.neuron
LEFT JOIN (
    SELECT t.layer, t.neuron, json_build_object('text', p.text, 'activation', t.coefficient, 'next_token', nt.text) AS top
    FROM triggers t
    JOIN prefixes p ON p.run_id = t.run_id AND p.document = t.document AND p.position = t.position
    LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
    WHERE t.run_id = %(run)s AND t.layer = ANY(%(layers)s) AND t.sign = 1 AND t.rank = 0
) tr ON tr.layer = n.layer AND tr.neuron = n.neuron
WHERE n.run_id = %(run)s AND n.layer = ANY(%(layers)s)
"""


def build_neuron_summaries(cur: Any, run_id: int, layers: list[int]) -> int:
    """Fill ``neuron_summaries`` for ``layers`` from their rows (already written); returns rows written."""
    return _hash_joined(cur, NEURON_SUMMARIES_SQL, {"run": run_id, "layers": layers})


def build_neuron_search(cur: Any, run_id: int, layer: int) -> int:
    """Fill ``neuron_search`` for one layer from its triggers (already written); returns rows written.

    The run's rows are not committed yet, so the planner's statistics (from the last ANALYZE, after
    the previous run) put about one row under this run id and choose a nested loop over triggers x
    prefixes: quadratic, over six minutes a layer for a second model's 77k triggers. A hash join is
    right for this bulk join whatever the statistics say.
    """
    return _hash_joined(cur, NEURON_SEARCH_SQL, {"run": run_id, "layer": layer})


def _hash_joined(cur: Any, sql: str, params: dict[str, Any]) -> int:
    """Run one bulk INSERT ... SELECT over a run's uncommitted rows with nested loops off (see
    ``build_neuron_search``); returns rows written."""
    cur.execute("SET LOCAL enable_nestloop = off")
    try:
        cur.execute(sql, params)
        return int(cur.rowcount)
    finally:
        cur.execute("SET LOCAL enable_nestloop = on")


def alembic_include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic autogenerate filter: per-run HNSW indexes (before revision 0010) belonged to runs, not to
    the schema."""
    return not (type_ == "index" and name is not None and name.startswith("ix_neurons_hnsw_"))
