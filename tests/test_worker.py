"""The Celery worker end to end: a real Redis broker, a real worker process, a real Postgres.

The test process is only a client: it sends ``extract_catalog`` by name, as any other machine on the
broker would, and reads the published catalog back from the database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import tiny_models
from celery import Celery
from celery.result import AsyncResult
from conftest import stop_process
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog.extract.pipeline import Parameters
from catalog.loading import ModelSourceError
from catalog.read.catalog import current_run
from catalog.runs.schemas import ExtractRequest
from catalog.store.models import CatalogModel, Neuron, RunStatus, Trigger
from workers.celery_app import create_app
from workers.tasks import EXTRACT_CATALOG, request_from_message

REPO = Path(__file__).resolve().parents[1]
# A generous upper bound for a stuck process, never an assertion about speed.
TASK_LIMIT_S = 300.0


@pytest.fixture(scope="module")
def worker(redis_url: str, migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """``celery worker`` as users start it, configured only through the environment."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,  # CATALOG_DATABASE_URL and CATALOG_DATA_DIR come from the database_url fixture
        "CATALOG_BROKER_URL": redis_url,
        "HF_HUB_OFFLINE": "1",
    }
    celery_bin = Path(sys.executable).with_name("celery")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(celery_bin), "-A", "workers.celery_app", "worker", "--pool=solo", "--concurrency=1",
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    proc.log_path = log  # type: ignore[attr-defined]  # read back when a task never finishes
    try:
        yield proc
    finally:
        stop_process(proc)  # SIGTERM: warm shutdown, as a user's Ctrl-C


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[Celery]:
    """A client with the worker's own configuration (JSON, late acks) on the test broker."""
    app = create_app(redis_url)
    try:
        yield app
    finally:
        app.close()


def _wait(result: AsyncResult, worker: subprocess.Popen[bytes]) -> None:
    """Wait for the task to finish, failing at once (with the worker's log) if the worker dies."""
    deadline = time.monotonic() + TASK_LIMIT_S
    while not result.ready():
        if worker.poll() is not None or time.monotonic() > deadline:
            log = Path(worker.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
            pytest.fail(f"task {result.id} did not finish (worker exit code {worker.poll()}):\n{log[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(
        "the cat sat on the mat .\n"
        "a big dog ran fast in the green house .\n"
        "the small bird sang to the sun and the moon .\n"
        "a red tree is on the river , and the blue bird was slow .\n"
    )
    return path


def test_request_message_round_trip() -> None:
    req = ExtractRequest(model="some/model", name="n", corpus="c.txt", max_tokens=100, params=Parameters(top_n=7))
    message = asdict(req)
    assert message["params"]["top_n"] == 7
    assert request_from_message(message) == req
    assert request_from_message({"model": "m"}) == ExtractRequest(model="m")
    with pytest.raises(TypeError):
        request_from_message({"model": "m", "params": {"top_k": 3}})


def test_worker_extracts_and_publishes_a_catalog(
    worker: subprocess.Popen[bytes], client: Celery, tiny_model: Path, corpus: Path, db_session: Session,
) -> None:
    name = "worker-tiny-gpt2"
    request = asdict(ExtractRequest(model=str(tiny_model), name=name, corpus=str(corpus), params=Parameters(top_n=3)))
    result = client.send_task(EXTRACT_CATALOG, args=[request])
    _wait(result, worker)
    summary = result.get(timeout=10)

    n_layers, d_mlp = tiny_models.N_LAYERS, tiny_models.D_MLP
    assert summary["name"] == name
    assert (summary["n_layers"], summary["d_mlp"]) == (n_layers, d_mlp)

    found = current_run(db_session, name)
    assert found is not None
    entry, run = found
    assert run.id == summary["run_id"]
    assert run.status == RunStatus.complete
    assert run.parameters["top_n"] == 3
    assert run.corpus_sha256 is not None
    assert entry.n_layers * entry.d_mlp == n_layers * d_mlp
    neurons = db_session.scalar(select(func.count()).select_from(Neuron).where(Neuron.run_id == run.id))
    assert neurons == n_layers * d_mlp
    # The corpus pass ran in the worker too: every neuron has its top-3 triggers.
    triggers = db_session.scalar(
        select(func.count()).select_from(Trigger).where(Trigger.run_id == run.id, Trigger.sign == 1)
    )
    assert triggers == n_layers * d_mlp * 3


def test_worker_reports_a_bad_request(
    worker: subprocess.Popen[bytes], client: Celery, tmp_path: Path, db_session: Session,
) -> None:
    missing = tmp_path / "no-such-model"
    request = asdict(ExtractRequest(model=str(missing), name="worker-missing"))
    result = client.send_task(EXTRACT_CATALOG, args=[request])
    _wait(result, worker)
    assert result.failed()
    # The user's one-line error crosses the broker as the same exception type.
    with pytest.raises(ModelSourceError, match="model not found"):
        result.get(timeout=10)
    assert db_session.scalar(select(CatalogModel).where(CatalogModel.name == "worker-missing")) is None
