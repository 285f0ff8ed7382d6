"""Alembic environment: the URL comes from the config's ``sqlalchemy.url`` (set by catalog.store.migrate).

A caller may instead hand over an open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from pgvector.sqlalchemy import VECTOR
from sqlalchemy import Connection, create_engine, pool, text

from catalog.store.models import Base
from catalog.store.search_index import alembic_include_name

config = context.config
target_metadata = Base.metadata

# Arbitrary constant key: serialises concurrent upgrades (e.g. CLI and a worker starting together).
MIGRATION_LOCK_KEY = 0x6E63_0001


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render pgvector columns as ``pgvector.sqlalchemy.Vector(...)`` (the public name) with its import."""
    if type_ == "type" and isinstance(obj, VECTOR):
        autogen_context.imports.add("import pgvector.sqlalchemy")
        return f"pgvector.sqlalchemy.Vector({obj.dim if obj.dim is not None else ''})"
    return False  # default rendering


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        include_name=alembic_include_name,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        # Held until this transaction ends; the version table is read after it is acquired, so a
        # second process waits and then finds nothing left to do.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set; run migrations through catalog.store.migrate")
    # NullPool: migrations are one-off; keep their connections out of the application's pools.
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            _run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
