"""Schema migrations (Alembic), configured in code so they run from an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool

from catalog.store.database import CONNECT_TIMEOUT_S, database_url, dispose_engine, normalize_url


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


def revision(message: str, url: str | None = None, autogenerate: bool = True, rev_id: str | None = None) -> None:
    """Write a new revision file (developer use), diffing the ORM against the database at ``url``."""
    command.revision(alembic_config(url or database_url()), message=message, autogenerate=autogenerate,
                     rev_id=rev_id)
