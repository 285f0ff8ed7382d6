"""Extraction runs against the real Postgres: replacing a catalog, and runs that fail or die mid-way.

A catalog must change only by one atomic publish: re-extracting a name replaces it without
duplicates; an exception, Ctrl-C or a killed process at any stage leaves the previous catalog as it
was, with no rows of the broken run visible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tiny_models import D_MLP, N_LAYERS

from catalog.export import records
from catalog.read.catalog import catalog_names
from catalog.runs.lifecycle import INTERRUPTED, RUN_LOCK_CLASS, reap_stale_runs
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store.database import get_engine, session_scope
from catalog.store.models import (
    CatalogModel,
    ExtractionRun,
    Layer,
    Neuron,
    Prefix,
    RunStatus,
    Token,
    Trigger,
    ValueToken,
)

ROW_TABLES = (Token, Layer, Neuron, ValueToken, Prefix, Trigger)
REPO = Path(__file__).resolve().parents[1]
# Generous: a CLI subprocess imports torch and transformers on a slow 2-core machine.
DEADLINE_S = 180.0


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two GPT-2 tiny models with different weights (seed 0 and seed 1)."""
    root = tmp_path_factory.mktemp("run-models")
    return {seed: tiny_models.save("gpt2", root / f"gpt2-seed{seed}", seed=seed) for seed in (0, 1)}


NAME_PREFIX = "test-runs-"


@pytest.fixture(scope="module")
def engine(migrated_db: str) -> Iterator[Engine]:
    engine = get_engine(migrated_db)
    yield engine
    # The database is shared by the whole session: leave no catalog behind for other modules.
    with session_scope(engine) as s:
        s.execute(delete(CatalogModel).where(CatalogModel.name.startswith(NAME_PREFIX, autoescape=True)))


def unique(prefix: str) -> str:
    return f"{NAME_PREFIX}{prefix}-{uuid.uuid4().hex[:8]}"


def run_extract(engine: Engine, model: Path, name: str, on_stage: Callable[[str], None] | None = None) -> int:
    return extract(ExtractRequest(model=str(model), name=name), engine=engine, on_stage=on_stage).run_id


@dataclass(frozen=True)
class Snapshot:
    """Everything a reader of the catalog entry can see."""

    entry: tuple[Any, ...]
    run: tuple[Any, ...]
    neurons: list[tuple[Any, ...]]
    value_tokens: list[tuple[Any, ...]]
    layers: list[tuple[Any, ...]]
    tokens: list[tuple[Any, ...]]
    exported: list[dict[str, Any]]


def snapshot(engine: Engine, name: str) -> Snapshot:
    with Session(engine) as s:
        entry = s.scalar(select(CatalogModel).where(CatalogModel.name == name))
        assert entry is not None and entry.current_run_id is not None
        rid = entry.current_run_id
        run = s.get(ExtractionRun, rid)
        assert run is not None
        return Snapshot(
            entry=(entry.id, entry.current_run_id, entry.source, entry.n_layers, entry.d_mlp, entry.vocab_size),
            run=(run.id, run.status, run.weights_sha256, run.tokenizer_sha256, run.finished_at),
            neurons=[tuple(r) for r in s.execute(
                select(Neuron.layer, Neuron.neuron, Neuron.key_norm, Neuron.value_norm, Neuron.bias, Neuron.alignment,
                       Neuron.key_vector).where(Neuron.run_id == rid).order_by(Neuron.layer, Neuron.neuron))],
            value_tokens=[tuple(r) for r in s.execute(
                select(ValueToken.layer, ValueToken.neuron, ValueToken.convention, ValueToken.kind, ValueToken.rank,
                       ValueToken.token_id, ValueToken.logit).where(ValueToken.run_id == rid)
                # the whole primary key: raw and folded rows share (layer, neuron, kind, rank)
                .order_by(ValueToken.layer, ValueToken.neuron, ValueToken.convention, ValueToken.kind, ValueToken.rank))],
            layers=[tuple(r) for r in s.execute(
                select(Layer.layer, Layer.mean_bias, Layer.mean_alignment, Layer.key_cosine_mean, Layer.histograms)
                .where(Layer.run_id == rid).order_by(Layer.layer))],
            tokens=[tuple(r) for r in s.execute(
                select(Token.token_id, Token.text).where(Token.run_id == rid).order_by(Token.token_id))],
            exported=list(records(s, name)),
        )


def row_counts(engine: Engine, run_id: int) -> dict[str, int]:
    with Session(engine) as s:
        return {
            t.__tablename__: int(s.scalar(select(func.count()).select_from(t).where(t.run_id == run_id)) or 0)
            for t in ROW_TABLES
        }


def runs_of(engine: Engine, name: str) -> list[ExtractionRun]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(
            select(ExtractionRun).join(CatalogModel, CatalogModel.id == ExtractionRun.model_id)
            .where(CatalogModel.name == name).order_by(ExtractionRun.id)
        ))


def entries_named(engine: Engine, name: str) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(CatalogModel).where(CatalogModel.name == name)) or 0)


def key_norms(seed: int) -> np.ndarray:
    """[layers * d_mlp] key norms of the seed's GPT-2 tiny model (c_fc is Conv1D: keys are columns)."""
    model: Any = tiny_models.build("gpt2", seed)
    return np.concatenate([
        np.linalg.norm(model.transformer.h[x].mlp.c_fc.weight.detach().double().numpy(), axis=0)
        for x in range(N_LAYERS)
    ])


def assert_no_rows(engine: Engine, run_id: int) -> None:
    assert row_counts(engine, run_id) == {t.__tablename__: 0 for t in ROW_TABLES}


# --- replacing a catalog ----------------------------------------------------------------------


def test_reextracting_replaces_the_catalog_without_duplicates(engine: Engine, models: dict[int, Path]) -> None:
    name = unique("replace")
    first = run_extract(engine, models[0], name)
    first_snap = snapshot(engine, name)
    second = run_extract(engine, models[0], name)  # same model again
    third = run_extract(engine, models[1], name)  # other weights under the same name
    assert first < second < third

    assert entries_named(engine, name) == 1
    with Session(engine) as s:
        assert catalog_names(s).count(name) == 1
    runs = runs_of(engine, name)
    assert [(r.id, r.status) for r in runs] == [(third, RunStatus.complete)]  # replaced runs are gone
    for old in (first, second):
        assert_no_rows(engine, old)
        with Session(engine) as s:
            assert s.get(ExtractionRun, old) is None

    snap = snapshot(engine, name)
    assert snap.entry[1] == third
    assert row_counts(engine, third)["neurons"] == N_LAYERS * D_MLP
    assert len(snap.exported) == N_LAYERS * D_MLP
    assert [(r["layer"], r["neuron"]) for r in snap.exported] == [(x, n) for x in range(N_LAYERS) for n in range(D_MLP)]
    # the figures are the new model's, not the old one's
    np.testing.assert_allclose([r[2] for r in snap.neurons], key_norms(1), rtol=1e-10)
    np.testing.assert_allclose([r[2] for r in first_snap.neurons], key_norms(0), rtol=1e-10)
    assert snap.run[2] != first_snap.run[2]  # weights hash


def test_same_model_twice_gives_the_same_catalog(engine: Engine, models: dict[int, Path]) -> None:
    name = unique("twice")
    run_extract(engine, models[0], name)
    before = snapshot(engine, name)
    run_extract(engine, models[0], name)
    after = snapshot(engine, name)
    assert after.run[0] != before.run[0]
    assert after.run[2:4] == before.run[2:4]  # weights and tokenizer hashes
    assert after.neurons == before.neurons
    assert after.value_tokens == before.value_tokens
    assert after.layers == before.layers
    assert after.tokens == before.tokens


# --- interrupted runs -------------------------------------------------------------------------


def interrupt_at(target: str, exc: BaseException, seen: list[str]) -> Callable[[str], None]:
    def hook(stage: str) -> None:
        seen.append(stage)
        if stage == target:
            raise exc

    return hook


@pytest.mark.parametrize(
    ("stage", "exc"),
    [
        ("weights", Injected("injected failure")),
        ("layer 1", Injected("injected failure")),
        ("publish", Injected("injected failure")),
        ("layer 1", KeyboardInterrupt()),
        ("publish", KeyboardInterrupt()),
    ],
    ids=["weights-error", "layer1-error", "publish-error", "layer1-ctrl-c", "publish-ctrl-c"],
)
def test_interrupted_run_leaves_the_previous_catalog(
    engine: Engine, models: dict[int, Path], stage: str, exc: BaseException,
) -> None:
    name = unique("interrupt")
    previous = run_extract(engine, models[0], name)
    before = snapshot(engine, name)

    seen: list[str] = []
    with pytest.raises(type(exc)):
        run_extract(engine, models[1], name, on_stage=interrupt_at(stage, exc, seen))
    assert seen[-1] == stage  # the hook really interrupted the run there

    after = snapshot(engine, name)
    assert after == before
    assert after.entry[1] == previous
    runs = runs_of(engine, name)
    assert [r.id for r in runs[:1]] == [previous] and len(runs) == 2
    failed = runs[1]
    # Ctrl-C stops a run resumable (part 8); an error fails it
    expected = RunStatus.interrupted if isinstance(exc, KeyboardInterrupt) else RunStatus.failed
    assert failed.status == expected
    assert failed.finished_at is not None
    if isinstance(exc, Injected):
        assert failed.error is not None and failed.error.startswith(type(exc).__name__)
        assert "injected failure" in failed.error
    else:
        assert failed.error == INTERRUPTED
    assert_no_rows(engine, failed.id)
    assert entries_named(engine, name) == 1

    # Nothing is left locked or half-written: the next extraction publishes normally.
    latest = run_extract(engine, models[1], name)
    assert snapshot(engine, name).entry[1] == latest
    np.testing.assert_allclose([r[2] for r in snapshot(engine, name).neurons], key_norms(1), rtol=1e-10)
    # the failed run stays (with its error) for the record; the superseded one is gone
    assert [(r.id, r.status) for r in runs_of(engine, name)] == [
        (failed.id, expected), (latest, RunStatus.complete),
    ]


@pytest.mark.parametrize("stage", ["layer 1", "publish"])
def test_failed_first_extraction_leaves_no_catalog_entry(engine: Engine, models: dict[int, Path], stage: str) -> None:
    name = unique("first-fails")
    run_ids: list[int] = []

    def hook(s: str) -> None:
        if s == stage:
            run_ids.extend(r.id for r in runs_of(engine, name))
            raise Injected("injected failure")

    with pytest.raises(Injected):
        run_extract(engine, models[0], name, on_stage=hook)
    assert len(run_ids) == 1
    assert entries_named(engine, name) == 0
    with Session(engine) as s:
        assert name not in catalog_names(s)
        assert s.get(ExtractionRun, run_ids[0]) is None
    assert_no_rows(engine, run_ids[0])


# --- killed processes -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # The session's database (CATALOG_DATABASE_URL / CATALOG_DATA_DIR) is in os.environ already.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


KILL_AT_STAGE = """
import os, signal, sys
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest

def hook(stage):
    if stage == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

extract(ExtractRequest(model=sys.argv[1], name=sys.argv[2]), on_stage=hook)
"""


def assert_killed_run_invisible(engine: Engine, name: str, previous: int, before: Snapshot) -> None:
    assert snapshot(engine, name) == before
    runs = runs_of(engine, name)
    assert [r.id for r in runs[:1]] == [previous] and len(runs) == 2
    killed = runs[1]
    # Nobody was left to mark it failed; it was never published and none of its rows committed.
    assert killed.status == RunStatus.running
    assert_no_rows(engine, killed.id)
    assert entries_named(engine, name) == 1


def assert_reaped(engine: Engine, name: str) -> None:
    """Once the dead process's connections are gone its run no longer holds its lock: reaped as interrupted (resumable)."""
    killed = runs_of(engine, name)[1]
    _wait_for(lambda: killed.id in reap_stale_runs(engine) or runs_of(engine, name)[1].status != RunStatus.running,
              None, "the killed run to be reaped")
    reaped = runs_of(engine, name)[1]
    assert reaped.status == RunStatus.interrupted and reaped.error == INTERRUPTED and reaped.finished_at is not None
    assert_no_rows(engine, reaped.id)


def test_process_killed_mid_ingest_leaves_the_previous_catalog(engine: Engine, models: dict[int, Path]) -> None:
    """SIGKILL after layer 0's rows are COPYed (the CLI test below kills one at the publish step)."""
    name, stage = unique("killed"), "layer 1"
    previous = run_extract(engine, models[0], name)
    before = snapshot(engine, name)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_STAGE, str(models[1]), name, stage],
        check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=DEADLINE_S,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_killed_run_invisible(engine, name, previous, before)
    assert_reaped(engine, name)
    # the server dropped the dead client's transaction: a new run publishes normally
    latest = run_extract(engine, models[1], name)
    assert snapshot(engine, name).entry[1] == latest


class PublishLock:
    """The advisory lock that publishers of a catalog name take, held in a transaction of our own."""

    def __init__(self, engine: Engine) -> None:
        self.conn = engine.connect()
        self.trans = self.conn.begin()

    def take(self, name: str) -> None:
        self.conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})

    def release(self) -> None:
        if self.trans.is_active:
            self.trans.rollback()
        self.conn.close()


@pytest.fixture
def publish_lock(engine: Engine) -> Iterator[PublishLock]:
    lock = PublishLock(engine)
    try:
        yield lock
    finally:
        lock.release()


def _wait_for(condition: Callable[[], Any], proc: subprocess.Popen[str] | None, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"neuron-catalog exited ({proc.returncode}) before {what}:\n{err}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_cli_killed_while_publishing_leaves_the_previous_catalog(
    engine: Engine, models: dict[int, Path], publish_lock: PublishLock,
) -> None:
    """`neuron-catalog extract` killed with SIGKILL after all its rows are written, before its commit.

    Holding the publish lock makes the kill land at a known point without any timing: the CLI has
    COPYed every row inside its open transaction and waits for the lock when it is killed.
    """
    name = unique("cli-killed")
    previous = run_extract(engine, models[0], name)
    before = snapshot(engine, name)
    publish_lock.take(name)

    cli = [str(Path(sys.executable).with_name("neuron-catalog")), "extract", "--model", str(models[1]), "--name", name]
    proc = subprocess.Popen(cli, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def waiting_backend() -> int | None:
            with engine.connect() as c:
                return c.scalar(text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> pg_backend_pid()"
                ))

        backend = _wait_for(waiting_backend, proc, "the CLI to wait for the publish lock")
        runs = runs_of(engine, name)
        assert runs[-1].status == RunStatus.running
        assert runs[-1].progress["stage"] == "weights, projections and ingest"
        # its rows are written, but only inside its uncommitted transaction
        assert_no_rows(engine, runs[-1].id)
        proc.kill()
        proc.wait(timeout=DEADLINE_S)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()

    assert_killed_run_invisible(engine, name, previous, before)

    def backend_gone() -> bool:
        with engine.connect() as c:
            return not c.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": backend})

    # Once the lock is released the orphaned backend gets it, finds its client gone and rolls back.
    publish_lock.release()
    _wait_for(backend_gone, None, "the killed CLI's database session to end")
    assert_killed_run_invisible(engine, name, previous, before)
    assert_reaped(engine, name)
    latest = run_extract(engine, models[1], name)
    assert snapshot(engine, name).entry[1] == latest


def test_live_runs_are_not_reaped(engine: Engine, models: dict[int, Path]) -> None:
    """A run whose process is alive (mid-stage, holding its lock) stays 'running'; reaping is a no-op."""
    name = unique("live")
    seen: dict[str, Any] = {}

    def held(run_id: int) -> int:
        with engine.connect() as c:
            return int(c.scalar(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = :c AND objid = :r AND objsubid = 2"
            ), {"c": RUN_LOCK_CLASS, "r": run_id}))

    def hook(stage: str) -> None:
        if stage == "weights":
            live = runs_of(engine, name)[-1]
            seen.update(id=live.id, held=held(live.id), reaped=reap_stale_runs(engine),
                        status=runs_of(engine, name)[-1].status)

    run_id = run_extract(engine, models[0], name, on_stage=hook)
    assert seen["id"] == run_id and seen["held"] == 1 and run_id not in seen["reaped"]
    assert seen["status"] == RunStatus.running
    assert runs_of(engine, name)[-1].status == RunStatus.complete
    # the finished run released its lock although its connection lives on in the pool
    assert held(run_id) == 0
