"""A run's neuron records as columns, one layer at a time: what bulk export reads.

:func:`catalog.read.catalog.records` builds one dict per neuron from row tuples, which is right for a
page but costs minutes for a whole catalog (a SmolLM2 layer has 150k triggers and 180k value tokens).
Here each layer's value tokens and triggers come back as one packed binary value per column, read
straight into numpy, with the floats that JSON needs already spelled by Postgres; each layer's trigger
prefixes are read once per layer, not once per trigger. The writers in :mod:`catalog.export` turn
these columns into the very records that ``records`` gives (tests hold them equal). Memory is bounded
by a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.read.catalog import NEURON_FIELDS, require_run
from catalog.store.models import CatalogModel, ExtractionRun, Neuron, Token
from catalog.vocab import ABLATIONS

# Value-token lists by code (the order of ``convention, kind`` in the primary key: folded < raw,
# bottom < top), so the codes come in the primary key's order.
TOKEN_LISTS = ("value_bottom_tokens_folded", "value_top_tokens_folded", "value_bottom_tokens", "value_top_tokens")


def json_float_sql(x: str, *, nan: str = "'NaN'") -> str:
    """SQL text of the float ``x`` as json.dumps writes it, but for |x| >= 1e15 (see :func:`split_json_floats`).

    Postgres' shortest round-trip digits are Python's ``repr``'s; the spelling differs only in an
    integral value's ".0" (added here) and in exponents from 15 on (Postgres writes 1e+15 where Python
    writes 1000000000000000.0, and an integral 2**60 with more digits than the shortest), which
    :func:`split_json_floats` redoes in Python. ``nan``: what NaN and null become ('NaN', as json.dumps
    writes it, or 'null' where records() cleans NaN to None).
    """
    return (f"CASE WHEN {x} IS NULL OR {x} = 'NaN'::float8 THEN {nan} "
            f"WHEN abs({x}) < 1e15 AND {x} = trunc({x}) THEN {x}::text || '.0' ELSE {x}::text END")


def split_json_floats(joined: str | None) -> list[str]:
    """The comma-joined :func:`json_float_sql` texts of a column as a list, exponents redone by Python."""
    if not joined:
        return []
    out = joined.split(",")
    if "e+" in joined:  # |x| >= 1e15: rare
        out = [float(v).__repr__() if "e+" in v else v for v in out]
    return out


# Each layer's rows come as one value per column: a big-endian packed array (the *send functions'
# binary forms, fixed-width) and, for JSON, the floats already spelled. One value instead of a row
# per trigger: psycopg costs microseconds per row, and there are 150k triggers in a SmolLM2 layer.
# Nulls cannot go into a fixed-width row: an ablation's null reads as NaN (records() shows NaN as null
# too). The layer's triggers are read by the primary key (run, layer, ...), not joined to prefixes:
# joined, the planner walks every prefix of the run through the (run, document, position) index and
# keeps the layer's rows afterwards.
_ORDER = {"value_tokens": "neuron, convention, kind, rank", "triggers": "neuron, sign DESC, rank"}
_WHERE = {
    "value_tokens": "run_id = %(run)s AND layer = %(layer)s AND convention IN ('raw', 'folded') AND kind IN ('top', 'bottom')",
    "triggers": "run_id = %(run)s AND layer = %(layer)s AND sign IN (1, -1)",
}
_PACKED = {
    "value_tokens": ("int4send(neuron) || int2send(CAST((convention = 'raw')::int * 2 + (kind = 'top')::int AS int2)) "
               "|| int4send(token_id) || float8send(logit)"),
    "triggers": ("int4send(neuron) || int2send(sign) || int8send(document) || int4send(position) "
                 "|| float8send(coefficient) || float8send(coalesce(coefficient_without_last, 'NaN')) "
                 "|| float8send(coalesce(coefficient_without_first, 'NaN')) "
                 "|| float8send(coalesce(coefficient_without_random, 'NaN'))"),
}
_DTYPE = {
    "value_tokens": [("neuron", "i4"), ("list", "i2"), ("token_id", "i4"), ("logit", "f8")],
    "triggers": [("neuron", "i4"), ("sign", "i2"), ("document", "i8"), ("position", "i4"), ("coefficient", "f8"),
                 ("without_last", "f8"), ("without_first", "f8"), ("without_random", "f8")],
}
# The floats as JSON text, as (expression, filter): value tokens' logits; triggers' activations, and
# positive triggers' ablations (three per trigger; records() cleans their NaN to null).
_JSON: dict[str, list[tuple[str, str | None]]] = {
    "value_tokens": [(json_float_sql("logit"), None)],
    "triggers": [(json_float_sql("coefficient"), None),
                 (" || ',' || ".join(json_float_sql(f"coefficient_without_{k}", nan="'null'") for k in ABLATIONS),
                  "sign = 1")],
}


def _layer_sql(table: str, json: bool) -> str:
    order = _ORDER[table]
    cols = [f"string_agg({_PACKED[table]}, ''::bytea ORDER BY {order})"]
    if json:
        cols += [f"string_agg({expr}, ',' ORDER BY {order})" + (f" FILTER (WHERE {only})" if only else "")
                 for expr, only in _JSON[table]]
    return f"SELECT {', '.join(cols)} FROM {table} WHERE {_WHERE[table]}"


# The distinct prefixes of the layer's triggers, in (document, position) order. MATERIALIZED keeps the
# planner from folding the keys back into a join driven by every prefix of the run.
_PREFIXES_SQL = """
WITH k AS MATERIALIZED (SELECT DISTINCT document, position FROM triggers
                        WHERE run_id = %(run)s AND layer = %(layer)s AND sign IN (1, -1))
SELECT p.document, p.position, p.text, p.next_token_id, p.text_after
FROM k JOIN prefixes p ON p.run_id = %(run)s AND p.document = k.document AND p.position = k.position
ORDER BY p.document, p.position"""


@dataclass(frozen=True)
class LayerColumns:
    """One layer of a run's records. Numpy arrays are native-endian; every array is in record order."""

    layer: int
    neurons: list[tuple[Any, ...]]  # (neuron, *NEURON_FIELDS[, key_vector, value_vector, up_vector]) by neuron
    tokens: np.ndarray  # _DTYPE["value_tokens"] rows by neuron, list code, rank
    triggers: np.ndarray  # _DTYPE["triggers"] rows by neuron, sign (+1 first), rank
    prefix: np.ndarray  # [len(triggers)] int64: each trigger's row in prefix_*
    prefix_document: list[int]
    prefix_position: list[int]
    prefix_text: list[str]
    prefix_next_token: list[int | None]
    prefix_text_after: list[str | None]
    # JSON only (split_json_floats): logits; activations; positive triggers' ablations, three per trigger
    logit_json: list[str] | None = None
    activation_json: list[str] | None = None
    ablations_json: list[str] | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each neuron's rows are: value tokens of list code c at ``tok[i, c]:tok[i, c + 1]``
        ([n, 5]); positive triggers at ``trig[i, 0]:trig[i, 1]``, negative ones at ``trig[i, 1]:trig[i, 2]``
        ([n, 3]); i indexes ``neurons``."""
        n = np.array([row[0] for row in self.neurons], dtype=np.int64)
        tok_key = self.tokens["neuron"].astype(np.int64) * 4 + self.tokens["list"]
        tok = np.searchsorted(tok_key, n[:, None] * 4 + np.arange(5))
        trig_key = self.triggers["neuron"].astype(np.int64) * 2 + (self.triggers["sign"] < 0)
        trig = np.searchsorted(trig_key, n[:, None] * 2 + np.arange(3))
        return tok, trig


def unpack(packed: bytes | None, dtype: list[tuple[str, str]]) -> np.ndarray:
    """Big-endian packed rows (int4send || float8send ...) as a native-endian numpy structured array."""
    rows = np.frombuffer(packed or b"", np.dtype([(name, ">" + t) for name, t in dtype]))
    return rows.astype(np.dtype(dtype))


def vocabulary(session: Session, run_id: int) -> dict[int, str]:
    return dict(session.execute(select(Token.token_id, Token.text).where(Token.run_id == run_id)).tuples().all())


def layer_columns(session: Session, entry: CatalogModel, run: ExtractionRun, *,
                  vectors: bool = False, json: bool = False) -> Iterator[LayerColumns]:
    """Every layer of ``run`` as columns, in layer order (records() order within each); ``json``: with
    the floats spelled as json.dumps writes them."""
    tokens_sql, triggers_sql = _layer_sql("value_tokens", json), _layer_sql("triggers", json)
    rid = int(run.id)
    cols = [Neuron.neuron, *(getattr(Neuron, f) for f in NEURON_FIELDS)]
    if vectors:
        cols += [Neuron.key_vector, Neuron.value_vector, Neuron.up_vector]
    dbapi = session.connection().connection.driver_connection  # psycopg's, in the session's transaction
    assert dbapi is not None
    cur = dbapi.cursor()
    try:
        for layer in range(entry.n_layers):
            neurons = list(session.execute(
                select(*cols).where(Neuron.run_id == rid, Neuron.layer == layer).order_by(Neuron.neuron)
            ).tuples())
            cur.execute(tokens_sql, {"run": rid, "layer": layer}, binary=True)
            packed, *logits = cur.fetchone()
            tokens = unpack(packed, _DTYPE["value_tokens"])
            cur.execute(triggers_sql, {"run": rid, "layer": layer}, binary=True)
            packed, *trigger_floats = cur.fetchone()
            triggers = unpack(packed, _DTYPE["triggers"])
            cur.execute(_PREFIXES_SQL, {"run": rid, "layer": layer})
            prefixes = cur.fetchall()
            docs = np.array([p[0] for p in prefixes], dtype=np.int64)
            positions = np.array([p[1] for p in prefixes], dtype=np.int64)
            # (document, position) as one sortable key; positions are int4, so 32 bits hold them
            prefix_key = (docs << 32) | positions
            trigger_key = (triggers["document"] << 32) | triggers["position"].astype(np.int64)
            index = np.searchsorted(prefix_key, trigger_key)
            if len(trigger_key) and (not len(prefix_key) or (index >= len(prefix_key)).any()
                                     or (prefix_key[np.minimum(index, len(prefix_key) - 1)] != trigger_key).any()):
                raise ValueError(f"layer {layer}: a trigger's prefix is missing")  # the foreign key forbids it
            yield LayerColumns(
                layer, neurons, tokens, triggers, index,
                docs.tolist(), positions.tolist(), [p[2] for p in prefixes], [p[3] for p in prefixes],
                [p[4] for p in prefixes],
                *((split_json_floats(logits[0]), split_json_floats(trigger_floats[0]),
                   split_json_floats(trigger_floats[1]))
                  if json else ()),
            )
    finally:
        cur.close()


def run_columns(session: Session, name: str, *, vectors: bool = False, json: bool = False
                ) -> tuple[CatalogModel, ExtractionRun, dict[int, str], Iterator[LayerColumns]]:
    """``name``'s entry, current run, vocabulary (token id -> text) and its layers as columns."""
    entry, run = require_run(session, name)
    return entry, run, vocabulary(session, run.id), layer_columns(session, entry, run, vectors=vectors, json=json)
