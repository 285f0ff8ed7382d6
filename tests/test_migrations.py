"""The Alembic migrations against a real Postgres, and connection failure reporting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, pool, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from catalog.store import migrate
from catalog.store.database import (
    DatabaseUnavailable,
    check_connection,
    dispose_engine,
    get_engine,
    normalize_url,
    safe_url,
    session_scope,
)
from catalog.store.models import Base, CatalogModel, ExtractionRun, Neuron, RunStatus
from catalog.store.search_index import alembic_include_name

TABLES = {"catalog_models", "extraction_runs", "tokens", "layers", "neurons", "value_tokens", "prefixes", "triggers"}


@pytest.fixture
def empty_db_url(database_url: str) -> Iterator[str]:
    """A freshly created database on the test server, dropped afterwards (the shared one is untouched)."""
    name = f"mig_test_{uuid.uuid4().hex[:12]}"
    # CREATE/DROP DATABASE cannot run inside a transaction.
    admin = create_engine(database_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engine(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _schema(url: str) -> tuple[set[str], dict[str, set[str]], set[str], set[str]]:
    """Tables, columns per table, installed extensions and enum types of the database at ``url``."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            tables = set(insp.get_table_names())
            columns = {t: {c["name"] for c in insp.get_columns(t)} for t in tables}
            extensions = set(conn.scalars(text("SELECT extname FROM pg_extension")))
            enums = set(conn.scalars(text("SELECT typname FROM pg_type WHERE typtype = 'e'")))
    finally:
        engine.dispose()
    return tables, columns, extensions, enums


def _complete_run(engine: Engine, *, d_mlp: int, vocab_size: int) -> int:
    """A one-layer catalog entry "m" with a complete run and no rows; returns the run's id."""
    with Session(engine) as s:  # (the ORM's defaults fill the rest)
        cm = CatalogModel(name="m", source="s", family="gpt2", model_type="gpt2", n_layers=1, d_model=4, d_mlp=d_mlp,
                          vocab_size=vocab_size, gated=False)
        s.add(cm)
        s.flush()
        r = ExtractionRun(model_id=cm.id, status=RunStatus.complete)
        s.add(r)
        s.commit()
        return r.id


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    assert migrate.current(empty_db_url) is None

    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == "0013"
    tables, columns, extensions, enums = _schema(empty_db_url)
    assert TABLES <= tables
    assert "vector" in extensions
    assert "run_status" in enums
    for table in Base.metadata.sorted_tables:
        assert columns[table.name] == {c.name for c in table.columns}, table.name

    migrate.downgrade(empty_db_url)
    assert migrate.current(empty_db_url) is None
    tables, _, extensions, enums = _schema(empty_db_url)
    assert not (TABLES & tables)
    assert "run_status" not in enums
    assert "vector" in extensions  # deliberately kept by the downgrade (see 0001_initial.py)

    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == "0013"
    assert TABLES <= _schema(empty_db_url)[0]
    # 0006: the prefix -> triggers join of pattern search reads only the index (index-only scan)
    engine = create_engine(empty_db_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            indexdef = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_triggers_run_document_position'"))
            # 0011: the prefixes keep their lexemes, the very ones of to_tsvector, and the GIN index reads them
        run = _complete_run(engine, d_mlp=4, vocab_size=4)
        with engine.begin() as conn:
            words = "The state-of-the-art walrus, v2.3 at https://example.com/x"
            conn.execute(text("INSERT INTO prefixes (run_id, document, position, text, token_id) "
                              "VALUES (:r, 0, 0, :t, 1)"), {"r": run, "t": words})
            same = conn.scalar(text("SELECT tsv = to_tsvector('simple', text) FROM prefixes"))
            tsv_index = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_prefixes_tsv'"))
    finally:
        engine.dispose()
    assert indexdef is not None and indexdef.endswith("(run_id, document, \"position\") INCLUDE (layer, neuron, sign, coefficient)"), indexdef
    assert same is True
    assert tsv_index is not None and tsv_index.endswith("USING gin (tsv)"), tsv_index


def test_orm_matches_migrated_schema(migrated_db: str) -> None:
    # No filtering needed: with compare_type=True the migrated schema shows no differences at all
    # (pgvector registers "vector" for reflection, so Vector columns compare equal).
    engine = create_engine(migrated_db, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            # Per-run HNSW indexes are made at publish time, not by migrations (search_index.py).
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": alembic_include_name})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_vectors_round_trip(migrated_db: str, db_session: Session) -> None:
    model = CatalogModel(name="vectors-round-trip", source="test", family="gpt2", model_type="gpt2", n_layers=1,
                         d_model=3, d_mlp=4, vocab_size=10, gated=False)
    db_session.add(model)
    db_session.flush()
    run = ExtractionRun(model_id=model.id)
    db_session.add(run)
    db_session.flush()
    db_session.add(Neuron(run_id=run.id, layer=0, neuron=0, key_norm=1.0, value_norm=1.0, alignment=0.5,
                          key_vector=[1.0, 2.0, 3.0], value_vector=[0.5, -0.5, 0.0]))
    db_session.flush()
    model.current_run_id = run.id
    db_session.flush()
    db_session.expire_all()

    # other test modules share this database: look at this run's rows only
    neuron = db_session.scalars(select(Neuron).where(Neuron.run_id == run.id)).one()
    assert list(neuron.key_vector) == [1.0, 2.0, 3.0]
    assert run.status is RunStatus.running
    # The circular foreign key: deleting the run clears the model's pointer.
    db_session.delete(run)
    db_session.flush()
    db_session.expire_all()
    assert db_session.get(CatalogModel, model.id).current_run_id is None  # type: ignore[union-attr]


def test_session_scope_rolls_back(migrated_db: str) -> None:
    with pytest.raises(RuntimeError), session_scope(get_engine(migrated_db)) as session:
        session.add(CatalogModel(name="rolled-back", source="x", family="x", model_type="x", n_layers=1,
                                 d_model=1, d_mlp=1, vocab_size=1, gated=False))
        session.flush()
        raise RuntimeError("boom")
    with session_scope(get_engine(migrated_db)) as session:
        assert session.scalars(select(CatalogModel).where(CatalogModel.name == "rolled-back")).first() is None


def test_unreachable_database_fails_fast() -> None:
    url = "postgresql+psycopg://u:s3cret-pw@127.0.0.1:1/x"
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(get_engine(url))
    dispose_engine(url)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "\n" not in message
    assert "127.0.0.1:1" in message
    assert "s3cret-pw" not in message
    assert message.startswith("cannot connect to the database at postgresql+psycopg://u@127.0.0.1:1/x: ")


def test_url_helpers() -> None:
    assert normalize_url("postgres://a:b@h:5/d") == "postgresql+psycopg://a:b@h:5/d"
    assert normalize_url("postgresql://postgres:@/postgres?host=/tmp/x") == (
        "postgresql+psycopg://postgres:@/postgres?host=/tmp/x"
    )
    assert normalize_url("postgresql+psycopg://a@h/d") == "postgresql+psycopg://a@h/d"
    assert safe_url("postgresql+psycopg://a:pw@h:5/d") == "postgresql+psycopg://a@h:5/d"


def test_0012_builds_the_stored_summaries_of_the_runs_already_there(empty_db_url: str) -> None:
    """A run written before 0012 gets its neurons' summary rows from its own rows: the top five promoted
    tokens per convention in rank order, the rank-0 positive trigger with its next token, and none
    (null, empty lists) where a neuron has no triggers or no folded tokens."""
    migrate.upgrade(empty_db_url, "0011")
    engine = create_engine(empty_db_url, poolclass=pool.NullPool)
    try:
        run = _complete_run(engine, d_mlp=2, vocab_size=8)
        raw = {0: [(t, 10.0 - t) for t in range(7)], 1: [(7 - t, 0.5 * t) for t in range(7)]}  # rank order
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tokens (run_id, token_id, text) SELECT :r, i, 'tok' || i FROM generate_series(0, 7) i"),
                         {"r": run})
            for n in (0, 1):
                conn.execute(text("INSERT INTO neurons (run_id, layer, neuron, key_norm, value_norm, alignment, key_vector, value_vector) "
                                  "VALUES (:r, 0, :n, 1, 1, 0, '[1,0,0,0]', '[0,1,0,0]')"), {"r": run, "n": n})
                for rank, (tok, logit) in reversed(list(enumerate(raw[n]))):  # stored out of order
                    conn.execute(text("INSERT INTO value_tokens (run_id, layer, neuron, convention, kind, rank, token_id, logit) "
                                      "VALUES (:r, 0, :n, 'raw', 'top', :k, :t, :l), (:r, 0, :n, 'raw', 'bottom', :k, 0, -1)"),
                                 {"r": run, "n": n, "k": rank, "t": tok, "l": logit})
            conn.execute(text("INSERT INTO value_tokens (run_id, layer, neuron, convention, kind, rank, token_id, logit) "
                              "VALUES (:r, 0, 0, 'folded', 'top', 0, 3, 2.5)"), {"r": run})
            conn.execute(text("INSERT INTO prefixes (run_id, document, position, text, token_id, next_token_id) "
                              "VALUES (:r, 0, 4, 'a walrus', 2, 5), (:r, 1, 2, 'the sea', 1, NULL)"), {"r": run})
            conn.execute(text("INSERT INTO triggers (run_id, layer, neuron, sign, rank, document, position, coefficient) "
                              "VALUES (:r, 0, 0, 1, 1, 1, 2, 0.5), (:r, 0, 0, 1, 0, 0, 4, 2.0), (:r, 0, 0, -1, 0, 1, 2, -3.0)"),
                         {"r": run})
        migrate.upgrade(empty_db_url)
        with engine.connect() as conn:
            got = {n: (a, b, c) for n, a, b, c in conn.execute(text(
                "SELECT neuron, top_tokens_raw, top_tokens_folded, top_trigger FROM neuron_summaries WHERE run_id = :r"),
                {"r": run}).tuples()}
    finally:
        engine.dispose()
    assert set(got) == {0, 1}
    for n in (0, 1):
        assert got[n][0] == [{"token_id": t, "token": f"tok{t}", "logit": lg} for t, lg in raw[n][:5]]
    assert got[0][1] == [{"token_id": 3, "token": "tok3", "logit": 2.5}] and got[1][1] == []
    assert got[0][2] == {"text": "a walrus", "activation": 2.0, "next_token": "tok5"}
    assert got[1][2] is None
