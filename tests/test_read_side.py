"""The read side as users meet it: light to import (no torch), clear on a database with no catalog
yet (CLI and API), the worker's parameters from settings, and `neuron-catalog serve` as a process.

Real Postgres throughout: the session server of conftest, plus a new empty database on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from cli_runner import CLI, REPO, cli, free_port
from conftest import stop_process
from sqlalchemy.engine import make_url

from catalog.config import settings
from catalog.store.database import dispose_engine

SEARCH_PATH = "/api/v1/models/{model}/neurons"
RecordProperty = Callable[[str, object], None]  # the record_property fixture


# --- helpers ----------------------------------------------------------------------------------





def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as psycopg/libpq takes it (no ``+psycopg``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def public_tables(url: str) -> list[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        return [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]


@pytest.fixture(scope="module")
def empty_db(database_url: str) -> Iterator[str]:
    """A new database on the session server with no schema at all; its SQLAlchemy URL."""
    name = f"newdb_{uuid.uuid4().hex[:12]}"
    admin = libpq_url(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    assert public_tables(url) == []
    try:
        yield url
    finally:
        dispose_engine(url)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- a. the read side imports no torch --------------------------------------------------------


def test_read_side_imports_no_torch(record_property: RecordProperty) -> None:
    code = (
        "import time, sys; t = time.perf_counter(); "
        "import catalog.api.app, catalog.read.search, catalog.read.vectors, catalog.export; "
        "app = catalog.api.app.create_app(); "
        "print('torch' in sys.modules); print(f'{time.perf_counter() - t:.3f}')"
    )
    started = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       check=False)
    wall = time.perf_counter() - started
    assert p.returncode == 0, p.stderr
    loaded_torch, import_s = p.stdout.split()
    assert loaded_torch == "False", "the read side (API app, search, vectors, export) imported torch"
    record_property("read_side_import_s", float(import_s))
    print(f"\nread-side import + create_app: {float(import_s):.2f} s (process {wall:.2f} s)")


# --- b. the CLI on a database with no catalog yet ---------------------------------------------


def test_cli_on_new_database(empty_db: str, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    env = {"CATALOG_DATABASE_URL": empty_db}
    commands = {
        "show": ("show", "--model", "x", "--layer", "0", "--neuron", "0"),
        "export": ("export", "--model", "x", "--out", str(out)),
        "layers": ("layers", "--model", "x"),
        "runs": ("runs",),
    }
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {k: pool.submit(cli, *args, env=env) for k, args in commands.items()}
        results = {k: f.result() for k, f in futures.items()}
    for name, r in results.items():
        assert r.returncode == 1, (name, r)
        assert "Traceback" not in r.stderr, (name, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, r.stderr)
        assert lines[0].startswith("error: "), (name, lines[0])
        assert "no catalog yet" in lines[0], (name, lines[0])
    assert not out.exists()
    # Reading must not create the schema behind the user's back.
    assert public_tables(empty_db) == []


# --- c. the API app on a database with no catalog yet -----------------------------------------


@pytest.fixture(scope="module")
def empty_api(empty_db: str) -> Iterator[str]:
    """create_app() under uvicorn in a thread, reading the empty database; its base URL."""
    from catalog.api.app import create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "database_url", empty_db)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


@pytest.mark.parametrize("path", [
    "/api/v1/models", "/api/v1/models/x/neurons", "/api/v1/models/x/layers", "/api/v1/models/x/neurons/0/0",
])
def test_api_on_new_database(empty_api: str, empty_db: str, path: str) -> None:
    r = httpx.get(empty_api + path, timeout=30)
    assert r.status_code in (503, 404), (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail"}, body
    assert "no catalog yet" in body["detail"], body
    assert public_tables(empty_db) == []


def test_api_health_on_new_database(empty_api: str) -> None:
    r = httpx.get(empty_api + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text


# --- d. Celery parameters come from the worker's settings -------------------------------------


def test_worker_parameters_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from catalog.runs.schemas import ExtractRequest, default_parameters
    from workers.tasks import request_from_message

    monkeypatch.setattr(settings, "label_min_prefix", 9)
    monkeypatch.setattr(settings, "label_quantile", 0.4)
    req = request_from_message({"model": "x"})
    assert req.model == "x"
    assert (req.params.label_min_prefix, req.params.label_quantile) == (9, 0.4)

    # Explicit parameters in the message win over settings; the ones it leaves out still follow them.
    req = request_from_message({"model": "x", "params": {"label_min_prefix": 7, "top_n": 7}})
    assert (req.params.label_min_prefix, req.params.label_quantile, req.params.top_n) == (7, 0.4, 7)

    # A full message as a producer builds it (asdict of a request made elsewhere) keeps its values.
    monkeypatch.setattr(settings, "label_min_prefix", 4)
    monkeypatch.setattr(settings, "label_quantile", 0.5)
    message = asdict(ExtractRequest(model="x", params=default_parameters(label_min_prefix=6)))
    monkeypatch.setattr(settings, "label_min_prefix", 9)
    monkeypatch.setattr(settings, "label_quantile", 0.4)
    req = request_from_message(message)
    assert (req.params.label_min_prefix, req.params.label_quantile) == (6, 0.5)

    with pytest.raises(TypeError):
        request_from_message({"model": "x", "params": {"no_such_parameter": 1}})


# --- e. `neuron-catalog serve` ----------------------------------------------------------------


def test_serve_help() -> None:
    r = cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    assert "--host" in r.stdout and "--port" in r.stdout, r.stdout


def _vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_serve(migrated_db: str, tmp_path: Path, record_property: RecordProperty) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    with log.open("w") as log_file:
        proc = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        healthy_after = None
        with httpx.Client(timeout=5) as client:
            while time.monotonic() - started < 60:
                assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()}"
                try:
                    if client.get(base + "/healthz").status_code == 200:
                        healthy_after = time.monotonic() - started
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            assert healthy_after is not None, f"no healthy answer within 60 s:\n{log.read_text()}"
            rss_mb = _vm_rss_mb(proc.pid)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()

            docs = client.get(base + "/docs")
            assert docs.status_code == 200 and "swagger" in docs.text.lower(), docs.text[:200]
            spec = client.get(base + "/openapi.json")
            assert spec.status_code == 200
            assert SEARCH_PATH in spec.json()["paths"], sorted(spec.json()["paths"])
            models = client.get(base + "/api/v1/models")
            assert models.status_code == 200, models.text
        record_property("serve_healthy_s", round(healthy_after, 3))
        record_property("serve_rss_mb", round(rss_mb, 1))
        print(f"\nserve: healthy after {healthy_after:.2f} s, VmRSS {rss_mb:.0f} MB")
        assert "libtorch" not in maps, "the API server loaded torch before any probe"
        assert rss_mb < 400, f"serve uses {rss_mb:.0f} MB before any request that needs a model"
    finally:
        stop_process(proc)  # SIGTERM, killed after 30 s
    assert proc.returncode in (0, -15), (proc.returncode, log.read_text())
