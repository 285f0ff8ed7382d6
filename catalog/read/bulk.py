"""A run's neuron records as columns, one layer at a time: what bulk export reads.

:func:`catalog.read.catalog.records` builds one dict per neuron from row tuples, which is right for a
page but costs minutes for a whole catalog (a SmolLM2 layer has 150k triggers and 180k value tokens).
Here the two big tables come back as binary ``COPY`` payloads read straight into numpy, and each
layer's trigger prefixes are read once per layer, not once per trigger. The writers in
:mod:`catalog.export` turn these columns into the very records that ``records`` gives (a test holds
them equal). Memory is bounded by one layer.
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

# Value-token lists by code (the order of ``convention, kind`` in the primary key: folded < raw,
# bottom < top), so the PK's index order is the code's order and the read needs no sort.
TOKEN_LISTS = ("value_bottom_tokens_folded", "value_top_tokens_folded", "value_bottom_tokens", "value_top_tokens")

# Nulls cannot go through a fixed-width numpy row: an ablation's null reads as NaN (records() shows
# NaN as null too) and a missing next token as -1.
_TOKENS_SQL = """
SELECT neuron, CAST((convention = 'raw')::int * 2 + (kind = 'top')::int AS int2), token_id, logit
FROM value_tokens
WHERE run_id = {run} AND layer = {layer} AND convention IN ('raw', 'folded') AND kind IN ('top', 'bottom')
ORDER BY neuron, convention, kind, rank"""
_TOKENS_DTYPE = [("neuron", "i4"), ("list", "i2"), ("token_id", "i4"), ("logit", "f8")]

# The layer's triggers by the primary key (run, layer, ...): no join. Joined to prefixes, the planner
# walks every prefix of the run through the (run, document, position) index and keeps the layer's
# rows afterwards; the prefixes come in their own query (_PREFIXES_SQL).
_TRIGGERS_SQL = """
SELECT neuron, sign, document, position, coefficient, coalesce(coefficient_without_last, 'NaN'),
       coalesce(coefficient_without_first, 'NaN'), coalesce(coefficient_without_random, 'NaN')
FROM triggers
WHERE run_id = {run} AND layer = {layer} AND sign IN (1, -1)
ORDER BY neuron, sign DESC, rank"""
_TRIGGERS_DTYPE = [("neuron", "i4"), ("sign", "i2"), ("document", "i8"), ("position", "i4"),
                   ("coefficient", "f8"), ("without_last", "f8"), ("without_first", "f8"), ("without_random", "f8")]

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
    tokens: np.ndarray  # _TOKENS_DTYPE rows by neuron, list code, rank
    triggers: np.ndarray  # _TRIGGERS_DTYPE rows by neuron, sign (+1 first), rank
    prefix: np.ndarray  # [len(triggers)] int64: each trigger's row in prefix_*
    prefix_document: list[int]
    prefix_position: list[int]
    prefix_text: list[str]
    prefix_next_token: list[int | None]
    prefix_text_after: list[str | None]

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


def copy_array(cur: Any, sql: str, dtype: list[tuple[str, str]]) -> np.ndarray:
    """The rows of ``sql`` through a binary COPY as a numpy structured array (native-endian). Every
    column must be fixed-width and never null: the rows are then one fixed-size record each."""
    buf = bytearray()
    with cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as cp:
        for chunk in cp:
            buf += chunk
    # header: 11-byte signature, int32 flags, int32 extension length (+ extension); trailer: int16 -1
    start = 19 + int.from_bytes(buf[15:19], "big")
    wire = np.dtype([("_fields", ">i2"), *((x, y) for name, t in dtype
                                            for x, y in ((f"_len_{name}", ">i4"), (name, ">" + t)))])
    body = memoryview(buf)[start : len(buf) - 2]
    if len(body) % wire.itemsize:
        raise ValueError("COPY rows are not fixed-width: a column is null or of another type")
    rows = np.frombuffer(body, wire)
    for name, t in dtype:
        if rows.size and (rows[f"_len_{name}"] != np.dtype(t).itemsize).any():
            raise ValueError(f"COPY column {name} is null or not {t}")
    out = np.empty(len(rows), dtype)
    for name, _ in dtype:
        out[name] = rows[name]
    return out


def vocabulary(session: Session, run_id: int) -> dict[int, str]:
    return dict(session.execute(select(Token.token_id, Token.text).where(Token.run_id == run_id)).tuples().all())


def layer_columns(session: Session, entry: CatalogModel, run: ExtractionRun, *,
                  vectors: bool = False) -> Iterator[LayerColumns]:
    """Every layer of ``run`` as columns, in layer order (records() order within each)."""
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
            tokens = copy_array(cur, _TOKENS_SQL.format(run=rid, layer=layer), _TOKENS_DTYPE)
            triggers = copy_array(cur, _TRIGGERS_SQL.format(run=rid, layer=layer), _TRIGGERS_DTYPE)
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
            )
    finally:
        cur.close()


def run_columns(session: Session, name: str, *, vectors: bool = False
                ) -> tuple[CatalogModel, ExtractionRun, dict[int, str], Iterator[LayerColumns]]:
    """``name``'s entry, current run, vocabulary (token id -> text) and its layers as columns."""
    entry, run = require_run(session, name)
    return entry, run, vocabulary(session, run.id), layer_columns(session, entry, run, vectors=vectors)
