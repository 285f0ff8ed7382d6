"""Write one extraction run's rows with COPY, inside the caller's transaction.

The writer takes plain named columns (numpy arrays, lists), keyed by the names of ``catalog.vocab``
and of the tables, never the pipeline's objects (``catalog.extract.columns`` turns those into
columns): so the store does not import the extraction side or torch, and anything that has the
columns (a pipeline, a merge of shard states, a benchmark) can write a run.

Bulk tables (neurons with their vectors, value tokens, triggers, neighbour lists) go in as binary
COPY payloads built column-wise by :mod:`catalog.store.copy`; the two tables with free text (tokens,
prefixes) use psycopg's row writer. Nothing here commits: the service publishes the run in the same
transaction.

Foreign keys: Postgres checks each row of a COPY with a query of its own, which tripled the cost of
the two largest tables (value_tokens 16 -> 51 s, triggers 26 -> 82 s for the demo's 3.7M and 4.6M
rows). Those tables reference only rows this writer wrote itself in the same transaction (the
layer's neurons, the run's prefixes, the run), so the writer checks the references itself, with
numpy on the very arrays it sends, and COPYs those tables with ``session_replication_role =
replica`` (what pg_restore does), which skips the per-row checks for that statement only; the
constraints stay declared and their ON DELETE CASCADE works as before. It needs a superuser (the
embedded server's role is one); any other role gets the per-row checks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from catalog.store import search_index
from catalog.store.copy import HEADER, TRAILER, Column, encode
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
        self.search_seconds = 0.0  # deriving neuron_search and neuron_summaries rows (part of ``seconds``)
        self._neurons_of: dict[int, int] = {}  # layer -> neurons written (ids 0..n-1)
        self._prefix_keys: np.ndarray | None = None  # sorted (document, position) keys written
        self._may_skip_checks: bool | None = None

    def _copy_binary(self, table: str, columns: Sequence[Column], *, checked: bool = True) -> None:
        """``checked=False``: the caller has verified every foreign key of these rows (module docstring)."""
        n = len(columns[0].values)
        chunks = ([_slice(c, start, start + CHUNK_ROWS) for c in columns] for start in range(0, n, CHUNK_ROWS))
        self._copy_chunks(table, [c.name for c in columns], chunks, checked=checked)

    def _copy_chunks(self, table: str, names: Sequence[str], chunks: Iterable[Sequence[Column]], *,
                     checked: bool) -> None:
        """One binary COPY of the rows of every chunk (each chunk: the columns ``names``, in order)."""
        t0 = time.perf_counter()
        n = 0
        with self.conn.cursor() as cur:
            skip = not checked and self._skip_checks(cur)
            if skip:
                cur.execute("SET LOCAL session_replication_role = replica")
            with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.write(HEADER)
                for chunk in chunks:
                    payload = encode(chunk, header=False, trailer=False)
                    n += len(chunk[0].values)
                    self.bytes += len(payload)
                    cp.write(payload)
                cp.write(TRAILER)
            if skip:  # (after an error the rollback undoes the SET LOCAL too)
                cur.execute("SET LOCAL session_replication_role = origin")
        self.rows[table] = self.rows.get(table, 0) + n
        self.seconds += time.perf_counter() - t0

    def _skip_checks(self, cur: Any) -> bool:
        """Whether this role may skip per-row foreign-key checks; the first time, also lock the run row
        against deletion until the commit (FOR KEY SHARE, as each row's check would)."""
        if self._may_skip_checks is None:
            cur.execute("SELECT current_setting('is_superuser') = 'on'")
            self._may_skip_checks = bool(cur.fetchone()[0])
            cur.execute("SELECT 1 FROM extraction_runs WHERE id = %s FOR KEY SHARE", [self.run_id])
            if cur.fetchone() is None:
                raise ValueError(f"no extraction run {self.run_id} to write rows for")
        return self._may_skip_checks

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
        keys = _prefix_key(np.asarray(columns["document"], dtype=np.int64), np.asarray(columns["position"], dtype=np.int64))
        known = keys if self._prefix_keys is None else np.concatenate([self._prefix_keys, keys])
        self._prefix_keys = np.unique(known)
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
        """One layer's rows, then its neuron_summaries rows, and its neuron_search rows when it has triggers.

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
            if triggers is not None:
                self.rows["neuron_search"] = self.rows.get("neuron_search", 0) + search_index.build_neuron_search(
                    cur, self.run_id, layer
                )
            self.rows["neuron_summaries"] = self.rows.get("neuron_summaries", 0) + search_index.build_neuron_summaries(
                cur, self.run_id, [layer]
            )
        self.search_seconds += time.perf_counter() - t0

    def similar_lists(self, space: str, d_mlp: int, ids: np.ndarray, cosines: np.ndarray, length: np.ndarray,
                      rows: Sequence[int] | None = None) -> None:
        """Neurons' similar-neuron lists in one space: row r holds ``ids[r, :length[r]]`` (flat ids) and
        their cosines, for the neuron of flat id ``rows[r]`` (layer * d_mlp + neuron; default r)."""
        flat = np.arange(len(length)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._copy_lists("similar_lists", {"space": ("label", [space] * len(flat)),
                                           "layer": ("int2", flat // d_mlp), "neuron": ("int4", flat % d_mlp)},
                         ids, cosines, length, "cosines")

    def token_lists(self, convention: str, ranking: str, ids: np.ndarray, scores: np.ndarray,
                    length: np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Tokens' ranking lists under one order and convention: row r holds ``ids[r, :length[r]]``
        (flat neuron ids) and their scores, for token id ``rows[r]`` (default r)."""
        tokens = np.arange(len(length)) if rows is None else np.asarray(rows, dtype=np.int64)
        n = len(tokens)
        self._copy_lists("token_lists", {"convention": ("label", [convention] * n), "ranking": ("label", [ranking] * n),
                                         "token_id": ("int4", tokens)}, ids, scores, length, "scores")

    def _copy_lists(self, table: str, keys: Mapping[str, tuple[str, Any]], ids: np.ndarray, scores: np.ndarray,
                    length: np.ndarray, score_column: str) -> None:
        """Rows of (run_id, *keys, ids int4[], scores float8[]): row r's arrays are the first length[r] of
        its ids and scores; one chunk per group of rows with the same length. The one foreign key is the
        run's, locked by ``_skip_checks``: the rows skip the per-row check."""
        length = np.asarray(length)
        if len(length) != len(ids):
            raise ValueError(f"{table}: {len(ids)} lists but {len(length)} lengths")

        def chunks() -> Iterator[list[Column]]:
            for size in np.unique(length).tolist():
                at = np.nonzero(length == size)[0]
                for start in range(0, len(at), CHUNK_ROWS):
                    part = at[start:start + CHUNK_ROWS]
                    yield [
                        Column("run_id", "int4", np.full(len(part), self.run_id)),
                        *(Column(name, kind, [values[i] for i in part] if kind == "label" else np.asarray(values)[part])
                          for name, (kind, values) in keys.items()),
                        Column("ids", "int4[]", np.asarray(ids)[part, :size].astype(np.int32)),
                        Column(score_column, "float8[]", np.asarray(scores)[part, :size].astype(np.float64)),
                    ]

        self._copy_chunks(table, ["run_id", *keys, "ids", score_column], chunks(), checked=False)

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
        self._neurons_of[layer] = n

    def _copy_table(self, table: str, layer: int, given: Mapping[str, ColumnValues], kinds: Mapping[str, str]) -> None:
        """One layer's rows of a table given flat, one entry per row for every column of ``kinds``."""
        _check(table, given, kinds, required=True)
        m = len(given["neuron"])
        self._references(table, layer, given)
        self._copy_binary(table, [
            Column("run_id", "int4", np.full(m, self.run_id)),
            Column("layer", "int2", np.full(m, layer)),
            *(Column(name, kind, given[name] if kind == "label" else np.asarray(given[name]))
              for name, kind in kinds.items()),
        ], checked=False)

    def _references(self, table: str, layer: int, given: Mapping[str, ColumnValues]) -> None:
        """The foreign keys of a layer's value_tokens or triggers rows, checked here (module docstring):
        each neuron is one this writer wrote for the layer, each trigger's prefix one it wrote."""
        neuron = np.asarray(given["neuron"], dtype=np.int64)
        n = self._neurons_of.get(layer)
        if n is None:
            raise ValueError(f"{table}: layer {layer}'s neurons are not written yet")
        if neuron.size and (neuron.min() < 0 or neuron.max() >= n):
            raise ValueError(f"{table}: layer {layer} has neurons 0-{n - 1}, not {int(neuron.min())}-{int(neuron.max())}")
        if table == "triggers":
            keys = _prefix_key(np.asarray(given["document"], dtype=np.int64), np.asarray(given["position"], dtype=np.int64))
            known = self._prefix_keys if self._prefix_keys is not None else np.zeros(0, np.int64)
            at = np.minimum(np.searchsorted(known, keys), max(len(known) - 1, 0))
            missing = ~(known[at] == keys) if len(known) else np.ones(len(keys), bool)
            if missing.any():
                i = int(np.argmax(missing))
                raise ValueError(f"triggers: layer {layer} refers to prefix (document {int(np.asarray(given['document'])[i])}, "
                                 f"position {int(np.asarray(given['position'])[i])}), which this run has not written")


def _prefix_key(document: np.ndarray, position: np.ndarray) -> np.ndarray:
    """One int64 per (document, position): documents are corpus indices and positions token offsets."""
    if document.size and (document.min() < 0 or document.max() >= 2**31 or position.min() < 0
                          or position.max() >= 2**32):
        raise ValueError("prefixes: a document or position is out of range (documents 0 to 2^31 - 1)")
    return (document << 32) | position


def _slice(c: Column, start: int, stop: int) -> Column:
    values = c.values[start:stop]
    null = None if c.null is None else c.null[start:stop]
    return Column(c.name, c.kind, values, null, c.nan_is_null)
