"""Write one extraction run's rows with COPY, inside the caller's transaction.

The writer takes plain named columns (numpy arrays, lists), keyed by the names of ``catalog.vocab``
and of the tables, never the pipeline's objects (``catalog.extract.columns`` turns those into
columns): so the store does not import the extraction side or torch, and anything that has the
columns (a pipeline, a merge of shard states, a benchmark) can write a run.

Bulk tables (neurons with their vectors, value tokens, triggers) go in as binary COPY payloads built
column-wise by :mod:`catalog.store.copy`; the two tables with free text (tokens, prefixes) use
psycopg's row writer. Nothing here commits: the service publishes the run in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from catalog.store import search_index
from catalog.store.copy import Column, encode
from catalog.vocab import ABLATIONS, LAYER_STATS, NEURON_FIGURES

CHUNK_ROWS = 250_000
# COPY types of the columns the writer is given (run_id and layer it adds itself)
_FIGURE_KINDS = {float: ("float8", np.float64), int: ("int4", np.int64)}
NEURON_VECTORS = ("key_vector", "value_vector", "up_vector")  # up_vector: None without an up-projection
LAYER_ROW = (*LAYER_STATS, "histograms")
PREFIX_COLUMNS = {"document": "int8", "position": "int4", "text": "text", "token_id": "int4",
                  "next_token_id": "int4", "text_after": "text"}
VALUE_TOKEN_COLUMNS = {"neuron": "int4", "convention": "label", "kind": "label", "rank": "int2", "token_id": "int4",
                       "logit": "float8"}
TRIGGER_COLUMNS = {"neuron": "int4", "sign": "int2", "rank": "int2", "document": "int8", "position": "int4",
                   "coefficient": "float8", **{f"coefficient_without_{k}": "float8" for k in ABLATIONS}}

ColumnValues = np.ndarray | Sequence[Any]


def _check(table: str, given: Mapping[str, Any], known: Sequence[str] | Mapping[str, Any], *,
           required: bool) -> None:
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"{table}: unknown columns {sorted(unknown)}; known: {', '.join(known)}")
    missing = set(known) - set(given)
    if required and missing:
        raise ValueError(f"{table}: missing columns {sorted(missing)}")


def _figure(values: ColumnValues | None, n: int, dtype: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A figure column's values and null mask (all null where the values are None; NaN is null too)."""
    if values is None:
        return np.zeros(n, dtype=dtype), np.ones(n, dtype=bool)
    arr = np.asarray(values).astype(dtype, copy=False)
    if arr.shape != (n,):
        raise ValueError(f"a figure column has shape {arr.shape}, not ({n},)")
    return arr, None


def clean_text(s: str) -> str:
    # Postgres text cannot hold NUL; byte-level tokenizers can decode one.
    return s.replace("\x00", "\ufffd")


class RunWriter:
    """COPYs a run's rows through one psycopg connection; ``seconds`` counts the time spent writing."""

    def __init__(self, dbapi_conn: Any, run_id: int) -> None:
        self.conn = dbapi_conn
        self.run_id = run_id
        self.seconds = 0.0
        self.rows: dict[str, int] = {}
        self.bytes = 0
        self.search_seconds = 0.0  # deriving neuron_search rows (part of ``seconds``)

    def _copy_binary(self, table: str, columns: Sequence[Column]) -> None:
        t0 = time.perf_counter()
        names = ", ".join(c.name for c in columns)
        n = len(columns[0].values)
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as cp:
            for start in range(0, max(n, 1), CHUNK_ROWS):
                part = [_slice(c, start, start + CHUNK_ROWS) for c in columns]
                payload = encode(part, header=start == 0, trailer=start + CHUNK_ROWS >= n)
                self.bytes += len(payload)
                cp.write(payload)
        self.rows[table] = self.rows.get(table, 0) + n
        self.seconds += time.perf_counter() - t0

    def _copy_rows(self, table: str, names: Sequence[str], types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        t0 = time.perf_counter()
        count = 0
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(list(types))
            for row in rows:
                cp.write_row(row)
                count += 1
        self.rows[table] = self.rows.get(table, 0) + count
        self.seconds += time.perf_counter() - t0

    def tokens(self, texts: Sequence[str], unembedding: np.ndarray | None = None) -> None:
        """The vocabulary; ``unembedding`` [vocab, d_model] float32 (rows of E) for token ranking."""
        rid = self.run_id
        if unembedding is None:
            self._copy_rows(
                "tokens", ("run_id", "token_id", "text"), ("int4", "int4", "text"),
                ((rid, i, clean_text(t)) for i, t in enumerate(texts)),
            )
            return
        self._copy_rows(
            "tokens", ("run_id", "token_id", "text", "unembedding"), ("int4", "int4", "text", "vector"),
            ((rid, i, clean_text(t), unembedding[i]) for i, t in enumerate(texts)),
        )

    def prefixes(self, columns: Mapping[str, Sequence[Any]]) -> None:
        """The run's trigger prefixes, column-wise (PREFIX_COLUMNS): document, position, text,
        token_id, next_token_id (None at a document's end) and text_after (optional; None outside
        encoders)."""
        _check("prefixes", columns, PREFIX_COLUMNS, required=False)
        n = len(columns["document"])
        after = columns.get("text_after")
        cols = [columns[k] for k in ("document", "position", "text", "token_id", "next_token_id")]
        cols.append(after if after is not None else [None] * n)
        rid = self.run_id
        self._copy_rows(
            "prefixes", ("run_id", *PREFIX_COLUMNS), ("int4", *PREFIX_COLUMNS.values()),
            (
                (rid, d, p, clean_text(t), k, x, None if r is None else clean_text(r))
                for d, p, t, k, x, r in zip(*cols, strict=True)
            ),
        )

    def layer(
        self, layer: int, row: Mapping[str, Any], neurons: Mapping[str, ColumnValues | None],
        value_tokens: Mapping[str, ColumnValues], triggers: Mapping[str, ColumnValues] | None = None,
    ) -> None:
        """One layer's rows, then its neuron_search rows when it has triggers.

        ``row``: the ``layers`` row (LAYER_ROW: the figures of ``vocab.LAYER_FIGURES`` and histograms;
        missing ones are null). ``neurons``: every figure of ``vocab.NEURON_FIGURES``, arrays [d_mlp]
        indexed by 0-based neuron (None or a missing key: null throughout; NaN: null), labels as
        a list of str | None, and NEURON_VECTORS ([d_mlp, d_model] float32; key and value required).
        ``value_tokens`` and ``triggers``: their tables' columns flattened, one entry per row
        (VALUE_TOKEN_COLUMNS, TRIGGER_COLUMNS; NaN coefficients are null); ``triggers`` None for a
        weight-only run.
        """
        self._layer_row(layer, row)
        self._neurons(layer, neurons)
        self._copy_table("value_tokens", layer, value_tokens, VALUE_TOKEN_COLUMNS)
        if triggers is not None:
            self._copy_table("triggers", layer, triggers, TRIGGER_COLUMNS)
            t0 = time.perf_counter()
            with self.conn.cursor() as cur:
                self.rows["neuron_search"] = self.rows.get("neuron_search", 0) + search_index.build_neuron_search(
                    cur, self.run_id, layer
                )
            self.search_seconds += time.perf_counter() - t0

    def similar_lists(self, space: str, d_mlp: int, ids: np.ndarray, cosines: np.ndarray, length: np.ndarray) -> None:
        """Every neuron's similar-neuron list in one space: row r (flat id layer * d_mlp + neuron) holds
        ``ids[r, :length[r]]`` (flat ids) and their cosines."""
        rid = self.run_id
        self._copy_rows(
            "similar_lists", ("run_id", "space", "layer", "neuron", "ids", "cosines"),
            ("int4", "text", "int2", "int4", "int4[]", "float8[]"),
            ((rid, space, r // d_mlp, r % d_mlp, ids[r, :n].tolist(), cosines[r, :n].tolist())
             for r, n in enumerate(length.tolist())),
        )

    def token_lists(self, convention: str, ranking: str, ids: np.ndarray, scores: np.ndarray,
                    length: np.ndarray) -> None:
        """Every token's ranking list under one order and convention: row t (the token id) holds
        ``ids[t, :length[t]]`` (flat neuron ids) and their scores."""
        rid = self.run_id
        self._copy_rows(
            "token_lists", ("run_id", "convention", "ranking", "token_id", "ids", "scores"),
            ("int4", "text", "text", "int4", "int4[]", "float8[]"),
            ((rid, convention, ranking, t, ids[t, :n].tolist(), scores[t, :n].tolist())
             for t, n in enumerate(length.tolist())),
        )

    def _layer_row(self, layer: int, row: Mapping[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        _check("layers", row, LAYER_ROW, required=False)
        cols = ["run_id", "layer", *row]
        t0 = time.perf_counter()
        with self.conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO layers ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                [self.run_id, layer, *(Jsonb(v) if isinstance(v, dict) else v for v in row.values())],
            )
        self.seconds += time.perf_counter() - t0

    def _neurons(self, layer: int, given: Mapping[str, ColumnValues | None]) -> None:
        _check("neurons", given, [*(f.name for f in NEURON_FIGURES), *NEURON_VECTORS], required=False)
        keys, values = np.asarray(given["key_vector"]), np.asarray(given["value_vector"])
        n = keys.shape[0]
        ups = given.get("up_vector")
        cols = [
            Column("run_id", "int4", np.full(n, self.run_id)),
            Column("layer", "int2", np.full(n, layer)),
            Column("neuron", "int4", np.arange(n)),
            Column("key_vector", "vector", keys, nan_is_null=False),
            Column("value_vector", "vector", values, nan_is_null=False),
            Column("up_vector", "vector", np.zeros((n, 1), np.float32), np.ones(n, bool), nan_is_null=False)
            if ups is None else Column("up_vector", "vector", np.asarray(ups), nan_is_null=False),
        ]
        for f in NEURON_FIGURES:
            v = given.get(f.name)
            if f.type is str:
                labels = [None] * n if v is None else list(v)
                if len(labels) != n:
                    raise ValueError(f"neurons: {f.name} has {len(labels)} values, not {n}")
                cols.append(Column(f.name, "label", labels))
            else:
                kind, dtype = _FIGURE_KINDS[f.type]
                cols.append(Column(f.name, kind, *_figure(v, n, dtype)))
        self._copy_binary("neurons", cols)

    def _copy_table(self, table: str, layer: int, given: Mapping[str, ColumnValues], kinds: Mapping[str, str]) -> None:
        """One layer's rows of a table given flat, one entry per row for every column of ``kinds``."""
        _check(table, given, kinds, required=True)
        m = len(given["neuron"])
        self._copy_binary(table, [
            Column("run_id", "int4", np.full(m, self.run_id)),
            Column("layer", "int2", np.full(m, layer)),
            *(Column(name, kind, given[name] if kind == "label" else np.asarray(given[name]))
              for name, kind in kinds.items()),
        ])


def _slice(c: Column, start: int, stop: int) -> Column:
    values = c.values[start:stop]
    null = None if c.null is None else c.null[start:stop]
    return Column(c.name, c.kind, values, null, c.nan_is_null)
