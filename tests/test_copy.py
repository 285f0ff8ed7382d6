"""catalog.store.copy's binary COPY payloads, round-tripped through the real Postgres.

Rows with every null pattern, special floats, integer extremes, pgvector vectors and short labels
(None, empty, non-ASCII) go in with ``encode`` and come back equal, also when split into chunks
(header on the first, trailer on the last) the way RunWriter streams them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import Connection

from catalog.store.copy import Column, encode
from catalog.store.database import get_engine

TABLE = """CREATE TEMP TABLE copy_rt (
    id int4, s int2, b int8, f4 float4, f8 float8, raw float8, flag bool, v vector, lbl text
) ON COMMIT DROP"""
NAMES = ("id", "s", "b", "f4", "f8", "raw", "flag", "v", "lbl")


@pytest.fixture
def conn(migrated_db: str) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back (the temp table goes with it)."""
    with get_engine(migrated_db).connect() as c:
        tx = c.begin()
        c.exec_driver_sql(TABLE)
        try:
            yield c
        finally:
            tx.rollback()


def _columns(n: int, seed: int = 0) -> list[Column]:
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    s = rng.integers(-(2**15), 2**15, n)
    s[: min(n, 2)] = [-(2**15), 2**15 - 1][: min(n, 2)]
    b = rng.integers(-(2**62), 2**62, n)
    b[: min(n, 2)] = [-(2**63), 2**63 - 1][: min(n, 2)]
    f4 = rng.standard_normal(n).astype(np.float32)
    f8 = rng.standard_normal(n)
    f8[: min(n, 4)] = [np.inf, -np.inf, -0.0, 1e-300][: min(n, 4)]
    nan_rows = rng.random(n) < 0.3
    f8[nan_rows] = np.nan  # NaN is NULL for this column (nan_is_null)
    raw = rng.standard_normal(n)
    raw[rng.random(n) < 0.3] = np.nan  # kept as NaN (nan_is_null=False)
    flag = rng.random(n) < 0.5
    v = rng.standard_normal((n, 5)).astype(np.float32)
    labels = [None, "", "shallow", "shallow+semantic", "sémantique"]
    lbl = [labels[i] for i in rng.integers(0, len(labels), n)]
    return [
        Column("id", "int4", ids),
        Column("s", "int2", s, rng.random(n) < 0.2),  # explicit null mask
        Column("b", "int8", b, rng.random(n) < 0.2),
        Column("f4", "float4", f4, rng.random(n) < 0.2),
        Column("f8", "float8", f8),
        Column("raw", "float8", raw, nan_is_null=False),
        Column("flag", "bool", flag, rng.random(n) < 0.1),
        Column("v", "vector", v, rng.random(n) < 0.25, nan_is_null=False),
        Column("lbl", "label", lbl),
    ]


def _expected(cols: list[Column]) -> dict[int, tuple[Any, ...]]:
    n = len(cols[0].values)
    masks = {c.name: c.null_mask(n) for c in cols}
    out: dict[int, tuple[Any, ...]] = {}
    for i in range(n):
        row: list[Any] = []
        for c in cols:
            if masks[c.name][i]:
                row.append(None)
            elif c.kind == "label":
                row.append(c.values[i])
            elif c.kind == "vector":
                row.append([float(x) for x in np.asarray(c.values)[i]])
            elif c.kind == "bool":
                row.append(bool(np.asarray(c.values)[i]))
            elif c.kind.startswith("float"):
                row.append(float(np.asarray(c.values)[i]))
            else:
                row.append(int(np.asarray(c.values)[i]))
        out[row[0]] = tuple(row)
    return out


def _copy(conn: Connection, payloads: list[bytes]) -> dict[int, tuple[Any, ...]]:
    dbapi: Any = conn.connection.driver_connection
    with dbapi.cursor() as cur:
        with cur.copy(f"COPY copy_rt ({', '.join(NAMES)}) FROM STDIN (FORMAT BINARY)") as cp:
            for p in payloads:
                cp.write(p)
        # float4 comes back as a Python float of the float4 value; the vector as text to parse.
        cur.execute(f"SELECT {', '.join(n if n != 'v' else 'v::text' for n in NAMES)} FROM copy_rt")
        got = {}
        for row in cur.fetchall():
            r = list(row)
            v = r[NAMES.index("v")]
            # pgvector prints the shortest text of each float4: read it back as float4.
            r[NAMES.index("v")] = None if v is None else [float(np.float32(x)) for x in v.strip("[]").split(",")]
            got[r[0]] = tuple(r)
    return got


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def _assert_rows(got: dict[int, tuple[Any, ...]], want: dict[int, tuple[Any, ...]]) -> None:
    assert got.keys() == want.keys()
    for k, row in want.items():
        for name, g, w in zip(NAMES, got[k], row, strict=True):
            if name == "f4" and g is not None and w is not None:
                assert np.float32(g) == np.float32(w), (k, name)
            else:
                assert _same(g, w), (k, name, g, w)


def test_round_trip(conn: Connection) -> None:
    cols = _columns(300)
    want = _expected(cols)
    # Every kind of row is there: nulls in each column, NaN kept, every label.
    assert all(any(r[j] is None for r in want.values()) for j, name in enumerate(NAMES) if name not in ("id", "raw"))
    assert any(isinstance(r[5], float) and math.isnan(r[5]) for r in want.values())
    _assert_rows(_copy(conn, [encode(cols)]), want)


def test_chunked_stream(conn: Connection) -> None:
    cols = _columns(250, seed=1)
    n, step = 250, 64
    payloads = []
    for start in range(0, n, step):
        part = [Column(c.name, c.kind, c.values[start : start + step],
                       None if c.null is None else c.null[start : start + step], c.nan_is_null) for c in cols]
        payloads.append(encode(part, header=start == 0, trailer=start + step >= n))
    _assert_rows(_copy(conn, payloads), _expected(cols))


def test_no_rows(conn: Connection) -> None:
    assert _copy(conn, [encode(_columns(0))]) == {}


@pytest.mark.parametrize("length", [0, 1, 50])
def test_arrays_round_trip(conn: Connection, length: int) -> None:
    """int4[] and float8[] (the neighbour lists): every element back exactly, special floats too, and
    an array of length 0 comes back as an empty array."""
    rng = np.random.default_rng(length)
    n = 40
    ids = rng.integers(-(2**31), 2**31, (n, length)).astype(np.int32)
    scores = rng.standard_normal((n, length))
    if length:
        scores[0, 0], scores[1, 0], scores[2, 0] = -0.0, np.inf, 5e-324  # kept as they are: no NULL in an array
    conn.exec_driver_sql("CREATE TEMP TABLE copy_arr (id int4, ids int4[], scores float8[]) ON COMMIT DROP")
    payload = encode([Column("id", "int4", np.arange(n)), Column("ids", "int4[]", ids),
                      Column("scores", "float8[]", scores)])
    dbapi: Any = conn.connection.driver_connection
    with dbapi.cursor() as cur:
        with cur.copy("COPY copy_arr (id, ids, scores) FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(payload)
        cur.execute("SELECT id, ids, scores, cardinality(ids) FROM copy_arr ORDER BY id")
        rows = cur.fetchall()
    assert [r[0] for r in rows] == list(range(n))
    for i, (_, got_ids, got_scores, card) in enumerate(rows):
        assert card == length
        assert got_ids == ids[i].tolist()
        assert all(_same(float(g), float(w)) for g, w in zip(got_scores, scores[i].tolist(), strict=True))


# --- RunWriter's own reference checks (the bulk tables skip Postgres's per-row foreign-key checks) ---


def _run(conn: Connection, name: str) -> int:
    from sqlalchemy.orm import Session

    from catalog.store.models import CatalogModel, ExtractionRun, RunStatus

    with Session(bind=conn, join_transaction_mode="create_savepoint") as s:
        entry = CatalogModel(name=name, source="test", family="llama", model_type="llama", n_layers=1, d_model=4,
                             d_mlp=3, vocab_size=10, gated=False)
        s.add(entry)
        s.flush()
        run = ExtractionRun(model_id=entry.id, status=RunStatus.running, parameters={}, progress={},
                            projection_convention="raw_unembedding")
        s.add(run)
        s.flush()
        rid = int(run.id)
        s.commit()
    return rid


def _layer(writer: Any, *, trigger_position: int = 1, value_neuron: int = 2) -> None:
    from catalog.vocab import ABLATIONS

    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.prefixes({"document": [0, 0, 7], "position": [0, 1, 3], "text": ["a", "a b", "c"],
                     "token_id": [1, 2, 3], "next_token_id": [2, None, 4]})
    writer.layer(0, {"mean_alignment": 0.0, "key_cosine_mean": 0.0, "value_cosine_mean": 0.0, "histograms": {}},
                 {"key_vector": v, "value_vector": -v, "key_norm": [1.0] * 3, "value_norm": [1.0] * 3,
                  "alignment": [0.5] * 3},
                 {"neuron": [0, 1, value_neuron], "convention": ["raw"] * 3, "kind": ["top"] * 3, "rank": [0, 0, 0],
                  "token_id": [1, 2, 3], "logit": [0.5, 0.25, 0.125]},
                 {"neuron": [0, 1, 2], "sign": [1, 1, -1], "rank": [0, 0, 0], "document": [0, 7, 0],
                  "position": [0, 3, trigger_position], "coefficient": [1.0, 2.0, -3.0],
                  **{f"coefficient_without_{k}": [0.5, 1.0, -1.0] for k in ABLATIONS}})
    writer.token_lists("raw", "logit", np.array([[2, 0, 1], [1, 2, -1]]), np.array([[3.0, 2.0, 1.0], [5.0, 4.0, 0]]),
                       np.array([3, 2]), rows=[4, 9])


def _rows(conn: Connection, rid: int) -> list[Any]:
    out = []
    for table, order in (("triggers", "layer, neuron, sign, rank"), ("value_tokens", "layer, neuron, kind, rank"),
                         ("token_lists", "token_id")):
        rows = conn.exec_driver_sql(f"SELECT * FROM {table} WHERE run_id = {rid} ORDER BY {order}").all()
        out.append([tuple(r)[1:] for r in rows])  # without run_id
    return out


def test_writer_skips_row_checks_and_writes_what_checked_copies_write(conn: Connection) -> None:
    """As the embedded superuser the bulk tables go in without per-row checks; a role that may not
    skip them gets the checked COPY: the same rows either way, and deleting the run still cascades."""
    from catalog.store.ingest import RunWriter

    dbapi: Any = conn.connection.driver_connection
    fast, slow = RunWriter(dbapi, _run(conn, "fast")), RunWriter(dbapi, _run(conn, "slow"))
    slow._may_skip_checks = False  # as a role that is not a superuser
    _layer(fast)
    _layer(slow)
    assert fast._may_skip_checks is True
    assert conn.exec_driver_sql("SHOW session_replication_role").scalar() == "origin"  # set back after each COPY
    got = _rows(conn, fast.run_id)
    assert got == _rows(conn, slow.run_id) and all(got)
    assert got[2] == [("raw", "logit", 4, [2, 0, 1], [3.0, 2.0, 1.0]), ("raw", "logit", 9, [1, 2], [5.0, 4.0])]
    conn.exec_driver_sql(f"DELETE FROM extraction_runs WHERE id = {fast.run_id}")
    assert not any(_rows(conn, fast.run_id))


@pytest.mark.parametrize(("bad", "message"), [
    ({"trigger_position": 2}, r"prefix \(document 0, position 2\), which this run has not written"),
    ({"value_neuron": 3}, r"value_tokens: layer 0 has neurons 0-2, not 0-3"),
])
def test_writer_refuses_a_row_whose_reference_it_did_not_write(conn: Connection, bad: dict[str, int],
                                                              message: str) -> None:
    from catalog.store.ingest import RunWriter

    writer = RunWriter(conn.connection.driver_connection, _run(conn, "bad"))
    with pytest.raises(ValueError, match=message):
        _layer(writer, **bad)
