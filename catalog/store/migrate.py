"""Schema migrations (Alembic), configured in code so they run from an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, pool
from sqlalchemy.exc import OperationalError

from catalog.store.database import (
    CONNECT_TIMEOUT_S,
    DatabaseUnavailable,
    _short_reason,
    database_url,
    dispose_engine,
    normalize_url,
    safe_url,
)


class SchemaMismatch(RuntimeError):
    """The database's schema revision is not this code's head; the message is one line, fit to show a user."""


def migrations_dir() -> Path:
    """The ``migrations`` folder: next to the ``catalog`` package, in a checkout and when installed."""
    here = Path(__file__).resolve().parents[2] / "migrations"
    if (here / "env.py").is_file():
        return here
    # Editable installs map packages through a finder rather than the file system layout.
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").is_file():
                return Path(location)
    raise FileNotFoundError("cannot find the 'migrations' folder (env.py) next to the catalog package")


def alembic_config(url: str) -> Config:
    """An Alembic config with no ini file: script location and target URL only."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Config values go through ConfigParser interpolation; a percent-encoded password must survive it.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url or database_url()), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    url = url or database_url()
    command.downgrade(alembic_config(url), revision)
    # Types (vector, run_status) may have been dropped; pooled connections hold adapters for their OIDs.
    dispose_engine(url)


def current(url: str | None = None) -> str | None:
    """The database's revision id, or None for an unmigrated database."""
    engine = create_engine(
        normalize_url(url or database_url()),
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(cfg)


def head() -> str:
    """This code's Alembic head revision."""
    found = _scripts().get_current_head()
    assert found is not None
    return found


def require_head(url: str | None = None, who: str = "this worker") -> str:
    """Raise :class:`SchemaMismatch` unless the database is at this code's head; returns the head.

    Workers call this instead of migrating: a schema is changed by one deliberate ``db upgrade`` (or
    an in-process extract), never by whichever worker starts first. Uses its own short-lived
    connection (no pool), so a worker's main process holds no connection its forked children share.
    """
    url = url or database_url()
    code_head = head()
    try:
        found = current(url)
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {safe_url(normalize_url(url))}: {_short_reason(exc)}"
        ) from exc
    if found == code_head:
        return code_head
    if found is None:
        raise SchemaMismatch(f"the database has no schema yet ({who}'s code is at head {code_head}): "
                             "run neuron-catalog db upgrade")
    try:
        known = _scripts().get_revision(found) is not None
    except CommandError:  # a revision this code has never heard of: written by newer code
        known = False
    if known:
        raise SchemaMismatch(f"the database schema is at revision {found}, older than {who}'s code "
                             f"(head {code_head}): run neuron-catalog db upgrade")
    raise SchemaMismatch(f"the database schema is at revision {found}, newer than {who}'s code "
                         f"(head {code_head}): update the worker")


def revision(message: str, url: str | None = None, autogenerate: bool = True, rev_id: str | None = None) -> None:
    """Write a new revision file (developer use), diffing the ORM against the database at ``url``."""
    command.revision(alembic_config(url or database_url()), message=message, autogenerate=autogenerate,
                     rev_id=rev_id)
