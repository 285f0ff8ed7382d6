"""Queue-driven runs (part 9), in process: the task bodies of catalog/runs/queued.py delivered by the
test in any order, each message twice, against a real Postgres and tiny seeded models.

A recording sender stands in for the broker (it keeps the messages the code sends; the test is the
worker that receives them), so delivery order and duplicates are the test's to choose. The real
broker and worker processes are in tests/test_distributed.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_shards
import torch
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine
from test_shards import PARAMS, exact_placement, export_of  # noqa: F401  (a fixture)

from catalog.runs import lifecycle, queued
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store.database import database_url, session_scope
from catalog.store.models import CatalogModel, ExtractionRun, RunShard, RunStatus, ShardKind, ShardState

pytestmark = pytest.mark.usefixtures("one_thread")

# the shard tests' module fixtures: the same corpus and tiny models (GPT-2, Llama, BERT)
corpus_file = test_shards.corpus_file
models = test_shards.models

SHARD_TOKENS = 97


class Recorder:
    """``Sender`` that keeps the messages (the test delivers them)."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, ...]] = []

    def shard(self, run_id: int, kind: str, index: int) -> None:
        self.messages.append(("shard", run_id, kind, index))

    def step(self, run_id: int, step: str) -> None:
        self.messages.append(("step", run_id, step))


def deliver(msg: tuple[Any, ...], sender: Recorder) -> str:
    if msg[0] == "shard":
        return queued.run_shard(msg[1], msg[2], msg[3], sender=sender, url=database_url())
    return queued.run_step(msg[1], msg[2], sender=sender, url=database_url())


def drain(sender: Recorder, rng: random.Random, twice: bool = True) -> list[tuple[tuple[Any, ...], str]]:
    """Deliver every message (in a random order, each one ``twice``) until none is left; returns
    (message, outcome) in delivery order."""
    log = []
    while sender.messages:
        batch, sender.messages = sender.messages, []
        batch = batch + batch if twice else batch
        rng.shuffle(batch)
        for msg in batch:
            log.append((msg, deliver(msg, sender)))
    return log


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    """Each test starts as a fresh worker process would."""
    for cache in (queued._models, queued._corpora, queued._merged, queued._starts):
        cache.clear()
    yield


def states(engine: Engine, run_id: int) -> dict[tuple[str, int], int]:
    with engine.connect() as conn:
        return {(k, int(i)): int(n) for k, i, n in conn.execute(
            select(ShardState.kind, ShardState.index, func.count()).where(ShardState.run_id == run_id)
            .group_by(ShardState.kind, ShardState.index))}


def shard_rows(engine: Engine, run_id: int) -> list[RunShard]:
    with session_scope(engine) as s:
        rows = list(s.scalars(select(RunShard).where(RunShard.run_id == run_id)
                              .order_by(RunShard.kind, RunShard.index)))
        s.expunge_all()
    return rows


def run_row(engine: Engine, run_id: int) -> ExtractionRun:
    with session_scope(engine) as s:
        row = s.get(ExtractionRun, run_id)
        assert row is not None
        s.expunge(row)
    return row


@pytest.mark.usefixtures("exact_placement")  # the in-process run keeps no start cache: bit for bit
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_every_message_twice_in_any_order_gives_the_in_process_catalog(
    engine: Engine, models: dict[str, Path], corpus_file: Path, family: str,
) -> None:
    """Shards, merge and finish delivered in a shuffled order, each twice: one state per shard, one
    publish, and the export of an in-process run with the same plan, exactly."""
    req = ExtractRequest(model=str(models[family]), name=f"q-{family}", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=SHARD_TOKENS)
    local = extract(ExtractRequest(**{**req.__dict__, "name": f"l-{family}"}))
    sender = Recorder()
    run_id = queued.plan(req, engine, None, sender)
    n_pass = len([m for m in sender.messages if m[0] == "shard"])
    assert n_pass == local.counts["shards"] > 5
    assert run_row(engine, run_id).driver == "queue"

    # a delivery while a live attempt holds the shard (its lock) does nothing
    with engine.connect() as holder:
        assert lifecycle.lock_shard(holder, run_id, "pass", 0)
        assert deliver(("shard", run_id, "pass", 0), sender) == "held"
        holder.execute(text("SELECT pg_advisory_unlock_all()"))
        holder.commit()
    assert shard_rows(engine, run_id)[0].attempts == 0

    rng = random.Random(family)
    log = drain(sender, rng)
    outcomes = [o for m, o in log if m[0] == "shard"]
    rows = shard_rows(engine, run_id)
    assert {r.kind for r in rows} == ({"pass"} if family == "bert" else {"pass", "ablation"})  # no encoder ablation
    # each shard computed once, by its first delivery; the duplicate found it done
    assert sum(o.startswith("done") and "already" not in o for o in outcomes) == len(rows), "\n".join(map(str, log))
    assert sum(o == "done already" for o in outcomes) == len(rows)
    assert [r.attempts for r in rows] == [1] * len(rows)
    steps = [(m[2], o) for m, o in log if m[0] == "step"]
    merges = [o for s, o in steps if s == "merge"]
    finishes = [o for s, o in steps if s == "finish"]
    assert len(merges) == 2 and sum(o.startswith("merged") for o in merges) == 1, merges
    assert len(finishes) == 2 and finishes.count("published") == 1, finishes
    assert any(o.startswith("nothing to do") for o in merges + finishes)

    run = run_row(engine, run_id)
    assert run.status == RunStatus.complete and run.step == "done" and run.step_attempts == 1  # finish, once
    assert states(engine, run_id) == {}  # spent at publish
    assert export_of(f"q-{family}") == export_of(f"l-{family}")

    # the merge message once more, after the publish: nothing happens
    assert deliver(("step", run_id, "merge"), sender).startswith("nothing to do: the run is complete")
    assert sender.messages == []


def test_a_worker_reads_the_starts_its_pass_shards_kept(
    engine: Engine, models: dict[str, Path], corpus_file: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker process that runs a run's pass shards and then its ablation shards keeps the
    windows' starts between them (ablation.StartCache): its ablation runs fewer tokens, and the
    catalog is the one of the starts run again (an in-process run without the cache) to float32
    rounding. The finish drops them."""
    from catalog.extract import ablation as abl

    req = ExtractRequest(model=str(models["llama"]), name="q-starts", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=SHARD_TOKENS)
    read: list[int] = []
    real = abl.StartCache.past
    monkeypatch.setattr(abl.StartCache, "past",
                        lambda self, origins, width: read.append(len(origins)) or real(self, origins, width))
    sender = Recorder()
    run_id = queued.plan(req, engine, None, sender)
    drain(sender, random.Random(5))
    assert run_row(engine, run_id).status == RunStatus.complete
    assert sum(read) > 20 and queued._starts == {}
    monkeypatch.setattr(test_shards.settings, "ablation_start_cache_mb", 0)
    ran = extract(ExtractRequest(**{**req.__dict__, "name": "l-starts"}))
    with session_scope() as s:
        progress = s.scalar(select(ExtractionRun.progress).where(ExtractionRun.id == run_id))
    assert progress["ablation_tokens"] < ran.counts["ablation_tokens"]
    got, want = export_of("q-starts"), export_of("l-starts")
    assert got != want
    test_shards.assert_same_catalog(got, want, rtol=1e-4, atol=1e-6)


def test_a_dead_attempt_is_taken_over_at_once_and_its_late_write_refused(
    engine: Engine, models: dict[str, Path], corpus_file: Path,
) -> None:
    """An attempt whose worker died leaves the shard `running` with a live lease but frees the lock:
    the next delivery takes it over as attempt 2 without waiting for the lease, and the dead
    attempt's write (a zombie that was only paused) is refused."""
    req = ExtractRequest(model=str(models["gpt2"]), name="q-dead", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=SHARD_TOKENS)
    sender = Recorder()
    run_id = queued.plan(req, engine, None, sender)
    shard = lifecycle.shard(engine, run_id, "pass", 1)
    assert shard is not None
    dead = lifecycle.claim(engine, shard, "gone:1", lease_s=3600, max_attempts=3)
    assert dead == 1
    assert deliver(("shard", run_id, "pass", 1), sender) == "done"
    row = shard_rows(engine, run_id)[1]
    assert (row.status, row.attempts, row.holder) == ("done", 2, lifecycle.holder_name())
    with pytest.raises(lifecycle.StaleLease):
        lifecycle.complete(engine, shard, dead, {-1: b"zombie"}, 1.0)
    assert states(engine, run_id)[("pass", 1)] > 1  # the newer attempt's state, not the zombie's byte
    lifecycle.cancel(engine, run_id)


def test_stranded_work_is_found_from_the_rows_alone(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    """The sweep re-sends what lost its message or its worker, never what a live task holds, and
    every piece once however many sweepers run."""
    req = ExtractRequest(model=str(models["gpt2"]), name="q-stranded", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=SHARD_TOKENS)
    sender = Recorder()
    run_id = queued.plan(req, engine, None, sender)
    n = len(sender.messages)
    assert lifecycle.dispatch(engine, sender, run_id) == []  # all sent just now: nothing is stranded
    # messages lost in the broker: found once they are older than the redelivery horizon
    with session_scope(engine) as s:
        s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.index < 2)
                  .values(sent_at=func.now() - text("interval '2 days'")))
    # a worker died mid-shard (running, lock free), while another live one holds shard 3
    shard2 = lifecycle.shard(engine, run_id, "pass", 2)
    assert shard2 is not None
    lifecycle.claim(engine, shard2, "gone:2", lease_s=3600, max_attempts=3)
    with engine.connect() as live:
        assert lifecycle.lock_shard(live, run_id, "pass", 3)
        shard3 = lifecycle.shard(engine, run_id, "pass", 3)
        assert shard3 is not None
        lifecycle.claim(engine, shard3, "alive:3", lease_s=3600, max_attempts=3, locked=True)
        found = lifecycle.dispatch(engine, sender, run_id)
        again = lifecycle.dispatch(engine, sender, run_id)  # a second sweeper right after: nothing
        live.execute(text("SELECT pg_advisory_unlock_all()"))
        live.commit()
    assert [d.shards for d in found] == [(("pass", 0), ("pass", 1), ("pass", 2))]
    assert again == []
    assert sender.messages[n:] == [("shard", run_id, "pass", i) for i in range(3)]
    rows = shard_rows(engine, run_id)
    assert (rows[2].status, rows[2].holder) == ("pending", None) and rows[2].attempts == 1
    assert (rows[3].status, rows[3].holder) == ("running", "alive:3")
    lifecycle.cancel(engine, run_id)


def test_a_cancelled_run_drops_its_messages_and_late_states(
    engine: Engine, models: dict[str, Path], corpus_file: Path,
) -> None:
    req = ExtractRequest(model=str(models["gpt2"]), name="q-cancel", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=SHARD_TOKENS)
    sender = Recorder()
    run_id = queued.plan(req, engine, None, sender)
    first = sender.messages.pop(0)
    assert deliver(first, sender) == "done"
    shard = lifecycle.shard(engine, run_id, "pass", 1)
    assert shard is not None
    attempt = lifecycle.claim(engine, shard, "slow:1", lease_s=3600, max_attempts=3)
    lifecycle.cancel(engine, run_id)
    with pytest.raises(lifecycle.RunCancelled):  # the slow attempt finishes after the cancel
        lifecycle.complete(engine, shard, attempt, {-1: b"late"}, 1.0)
    assert all(deliver(m, sender).startswith("dropped: run") for m in sender.messages)
    assert states(engine, run_id) == {}
    with session_scope(engine) as s:
        entry = s.scalar(select(CatalogModel).where(CatalogModel.name == "q-cancel"))
        assert entry is not None and entry.current_run_id is None
    assert run_row(engine, run_id).status == RunStatus.cancelled


def test_fatal_device_errors_are_told_apart() -> None:
    assert queued.fatal_device_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert queued.fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert queued.fatal_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert not queued.fatal_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not queued.fatal_device_error(ValueError("CUDA error"))  # only the runtime's own errors
    assert ShardKind("pass") is ShardKind.pass_
