"""Run and shard state: the only code that commits it. Torch-free (the API image's `runs` uses it).

A run is a row with a status and a step; its pieces are ``run_shards`` rows. Liveness:

- a *local* run (driver ``local``) is driven by one process that holds a session-level advisory
  lock keyed by the run id (``RUN_LOCK_CLASS``) for as long as it drives it. A ``running`` local
  run whose lock is free and none of whose shards holds a live lease lost its process: ``reap``
  marks it ``interrupted``, and ``runs resume`` goes on from its finished shards;
- a *shard* is alive while its holder's lease runs (holder, ``lease_expires_at``, attempt number).
  Every attempt takes a new number; the write that marks a shard done names its attempt and is
  refused once another attempt has taken the shard (fencing), so a stale holder's late write cannot
  overwrite the newer holder's state. Runs driven by a queue (part 9) are never reaped: their
  shards may simply be waiting for a worker.

Shard states are written in the transaction that marks the shard done, replacing any earlier
state of that shard, and dropped once the run is published.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.store.database import get_engine, session_scope
from catalog.store.models import (
    CatalogModel,
    ExtractionRun,
    RunShard,
    RunStatus,
    RunStep,
    ShardKind,
    ShardState,
    ShardStatus,
)

# First key of the two-int advisory lock a live local run's driver holds (the second is the run id).
RUN_LOCK_CLASS = 0x4E43  # "NC"
# Key (with 0) of the session-level advisory lock that one run at a time holds while it writes,
# publishes and cleans up. Concurrent writers would otherwise deadlock: each transaction holds ROW
# EXCLUSIVE on neurons from its COPY and then wants SHARE for its HNSW CREATE INDEX; DROP INDEX
# CONCURRENTLY and ANALYZE of the cleanup conflict likewise. Pass and ablation shards run side by side.
WRITE_LOCK_CLASS = 0x4E57  # "NW"
WAITING_TO_WRITE = "waiting for another extraction to finish writing"
INTERRUPTED = ("interrupted: the extracting process ended before finishing (killed or lost); "
               "nothing was published; `neuron-catalog runs resume ID` goes on from its finished shards")
RESUMABLE = (RunStatus.interrupted, RunStatus.failed)


class RunStateError(RuntimeError):
    """A run or shard is not in a state that allows what was asked (one line for the user)."""


class StaleLease(RunStateError):
    """This attempt no longer holds its shard: another attempt took it over; its write is refused."""


class RunCancelled(RunStateError):
    """The run was cancelled (``runs cancel``): its driver stops and publishes nothing."""


class ShardFailed(RunStateError):
    """A shard used up its attempts; the run fails with the shard's last error."""


def holder_name() -> str:
    """``hostname:pid`` of this process (in a container: the container's hostname): who holds a
    shard's lease or a distributed request."""
    return f"{socket.gethostname()}:{os.getpid()}"


def one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --- registering and driving a run -------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """One shard as planned: corpus documents [doc_start, doc_stop) and its size (tokens or prefixes)."""

    doc_start: int
    doc_stop: int
    tokens: int
    byte_offset: int | None = None  # where doc_start's line begins in a text/JSONL file


def register(
    conn: Connection, *, name: str, entry: Mapping[str, Any], run: Mapping[str, Any], shards: Sequence[ShardPlan],
    fence: Any = None, driver: str = "local",
) -> tuple[int, bool]:
    """Create the run row (and the catalog entry if new) with its pass shards, and (a local run)
    take the run's liveness lock on ``conn``. Returns (run id, whether the entry is new).

    The lock is taken before the row commits, so no other process ever sees a local run ``running``
    without its lock. A queue-driven run has no driver process: its shards' and steps' own locks
    say who is alive. ``fence``: catalog.runs.schemas.Fence.
    """
    with Session(bind=conn) as s, s.begin():
        model = s.scalar(select(CatalogModel).where(CatalogModel.name == name))
        created = model is None
        if model is None:
            model = CatalogModel(name=name, **entry)
            s.add(model)
            s.flush()
        first = RunStep.pass_ if shards or driver == "local" else RunStep.finish
        row = ExtractionRun(model_id=model.id, status=RunStatus.running, step=first.value, driver=driver,
                            progress={"stage": "starting"}, **run)
        s.add(row)
        s.flush()
        if shards:
            s.execute(insert(RunShard), [
                {"run_id": row.id, "kind": ShardKind.pass_.value, "index": i, "doc_start": p.doc_start,
                 "doc_stop": p.doc_stop, "tokens": p.tokens, "byte_offset": p.byte_offset}
                for i, p in enumerate(shards)])
        if fence is not None:  # before the lock: a refusal rolls back with nothing left held
            fence.registered(s, row.id)
        if driver == "local":
            s.execute(text("SELECT pg_advisory_lock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": row.id})
        return row.id, created


def take_over(conn: Connection, run_id: int) -> dict[str, Any]:
    """Resume a local run: take its liveness lock on ``conn``, check that it may go on, and set it
    ``running`` again. Shards left ``running`` by its dead driver go back to ``pending`` (their
    attempt numbers stay, so a zombie's late write is still refused); failed shards get their
    attempts back. Returns the run's stored request."""
    held = conn.scalar(text("SELECT pg_try_advisory_lock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run_id})
    conn.commit()  # the session below must own (and commit) its own transaction on this connection
    if not held:
        conn.close()
        raise RunStateError(f"run {run_id} is being extracted by a live process; nothing to resume")
    try:
        with Session(bind=conn) as s, s.begin():
            run = s.get(ExtractionRun, run_id, with_for_update=True)
            if run is None:
                raise RunStateError(f"no run {run_id} (see `neuron-catalog runs`)")
            if run.driver != "local":
                raise RunStateError(f"run {run_id} is driven by the workers' queue: `runs resume` re-queues it")
            if run.status == RunStatus.running:
                run.status = RunStatus.interrupted  # its driver is gone: we hold its lock
            if run.status not in RESUMABLE:
                raise RunStateError(f"run {run_id} is {run.status.value}: only an interrupted or failed run resumes")
            if run.request is None:
                raise RunStateError(f"run {run_id} was made before runs could resume (no stored request)")
            s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.status == ShardStatus.running.value)
                      .values(status=ShardStatus.pending.value, holder=None, lease_expires_at=None))
            s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.status == ShardStatus.failed.value)
                      .values(status=ShardStatus.pending.value, attempts=0, holder=None, lease_expires_at=None))
            run.status, run.error, run.finished_at = RunStatus.running, None, None
            return dict(run.request)
    except BaseException:
        release(conn)
        raise


def take_write_lock(conn: Connection, engine: Engine, run_id: int) -> None:
    """Take the write lock on the run's liveness connection (see ``WRITE_LOCK_CLASS``), saying so
    in the run's progress while another extraction holds it."""
    if not conn.scalar(text("SELECT pg_try_advisory_lock(:c, 0)"), {"c": WRITE_LOCK_CLASS}):
        conn.commit()
        set_progress(engine, run_id, WAITING_TO_WRITE)
        conn.execute(text("SELECT pg_advisory_lock(:c, 0)"), {"c": WRITE_LOCK_CLASS})
    conn.commit()  # the liveness connection must not sit idle in a transaction


def release(conn: Connection) -> None:
    # The pool would keep the connection, and a session-level lock with it: unlock explicitly (the
    # run's lock and, when taken, the write lock). A connection that broke meanwhile took its locks
    # with it, so errors here are moot.
    try:
        conn.execute(text("SELECT pg_advisory_unlock_all()"))
        conn.commit()
    except Exception:  # noqa: BLE001  (any failure: the connection is dropped with its lock)
        conn.invalidate()
    finally:
        conn.close()


def set_progress(engine: Engine, run_id: int, stage: str, **figures: Any) -> None:
    with session_scope(engine) as s:
        s.execute(update(ExtractionRun).where(ExtractionRun.id == run_id)
                  .values(progress={"stage": stage, **figures}))


def set_step(engine: Engine, run_id: int, step: RunStep) -> None:
    """Move the run to ``step``, unless it was cancelled meanwhile (then raise RunCancelled)."""
    with session_scope(engine) as s:
        status = s.scalar(select(ExtractionRun.status).where(ExtractionRun.id == run_id).with_for_update())
        if status == RunStatus.cancelled:
            raise RunCancelled(f"run {run_id} was cancelled")
        s.execute(update(ExtractionRun).where(ExtractionRun.id == run_id).values(step=step.value))


def check_running(engine: Engine, run_id: int) -> None:
    """Raise RunCancelled (or RunStateError) unless the run is still ``running``."""
    with engine.connect() as conn:
        status = conn.scalar(select(ExtractionRun.status).where(ExtractionRun.id == run_id))
    if status == RunStatus.cancelled:
        raise RunCancelled(f"run {run_id} was cancelled")
    if status != RunStatus.running:
        raise RunStateError(f"run {run_id} is {status.value if status else 'gone'}; stopping")


def interrupt(engine: Engine, run_id: int) -> None:
    """Ctrl-C: the run stops resumable (its running shards go back to pending)."""
    with session_scope(engine) as s:
        s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.status == ShardStatus.running.value)
                  .values(status=ShardStatus.pending.value, holder=None, lease_expires_at=None))
        s.execute(update(ExtractionRun).where(ExtractionRun.id == run_id, ExtractionRun.status == RunStatus.running)
                  .values(status=RunStatus.interrupted, error=INTERRUPTED, finished_at=func.now()))


def fail(engine: Engine, run_id: int, created_entry: bool, error: BaseException | str) -> None:
    """Mark the run failed with its error (a cancelled run stays cancelled). An entry that never had a
    catalog goes with its failed run."""
    message = error if isinstance(error, str) else one_line(error)
    with session_scope(engine) as s:
        run = s.get(ExtractionRun, run_id, with_for_update=True)
        if run is None or run.status in (RunStatus.cancelled, RunStatus.complete, RunStatus.superseded,
                                         RunStatus.failed):
            return  # a failed run keeps its first error (two shards of a queue run may fail at once)
        run.status = RunStatus.failed
        run.error = message[:2000]
        run.finished_at = datetime.now(UTC)
        if created_entry:
            entry = s.get(CatalogModel, run.model_id)
            if entry is not None and entry.current_run_id is None:
                s.delete(entry)  # cascades to the run: nothing to resume without a model entry


def cancel(engine: Engine | None, run_id: int) -> RunStatus:
    """Stop a run for good: its driver stops at the next shard and publishes nothing. Returns the
    status it had. A published run cannot be cancelled."""
    engine = engine or get_engine()
    with session_scope(engine) as s:
        run = s.get(ExtractionRun, run_id, with_for_update=True)
        if run is None:
            raise RunStateError(f"no run {run_id} (see `neuron-catalog runs`)")
        before = run.status
        if before in (RunStatus.complete, RunStatus.superseded):
            raise RunStateError(f"run {run_id} is {before.value}: a published run cannot be cancelled")
        if before != RunStatus.cancelled:
            run.status, run.finished_at = RunStatus.cancelled, datetime.now(UTC)
            run.error = run.error or "cancelled"
    with session_scope(engine) as s:  # after the commit: a shard finishing meanwhile sees the run cancelled
        s.execute(delete(ShardState).where(ShardState.run_id == run_id))
    return before


def reap_stale_runs(engine: Engine | None = None) -> list[int]:
    """Mark ``running`` local runs whose driver is gone (lock free, no live shard lease) as
    ``interrupted``; returns their ids. Queue-driven runs are left alone (their shards may wait)."""
    engine = engine or get_engine()
    stale = []
    with engine.connect() as conn:
        live_lease = (select(RunShard.run_id).where(RunShard.status == ShardStatus.running.value,
                                                    RunShard.lease_expires_at > func.now()))
        candidates = conn.scalars(select(ExtractionRun.id).where(
            ExtractionRun.status == RunStatus.running, ExtractionRun.driver == "local",
            ExtractionRun.id.not_in(live_lease))).all()
        for run_id in candidates:
            if conn.scalar(text("SELECT pg_try_advisory_lock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run_id}):
                conn.execute(text("SELECT pg_advisory_unlock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run_id})
                stale.append(run_id)
        if stale:
            conn.execute(update(RunShard).where(RunShard.run_id.in_(stale),
                                                RunShard.status == ShardStatus.running.value)
                         .values(status=ShardStatus.pending.value, holder=None, lease_expires_at=None))
            conn.execute(
                update(ExtractionRun)
                .where(ExtractionRun.id.in_(stale), ExtractionRun.status == RunStatus.running)
                .values(status=RunStatus.interrupted, error=INTERRUPTED, finished_at=func.now())
            )
        conn.commit()
    return stale


# --- shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    run_id: int
    kind: str
    index: int
    doc_start: int
    doc_stop: int
    tokens: int
    status: str
    attempts: int
    byte_offset: int | None = None


def shards(engine: Engine, run_id: int, kind: ShardKind, index: int | None = None) -> list[Shard]:
    """The run's shards of ``kind`` in index order (``index``: that one only)."""
    where = [RunShard.run_id == run_id, RunShard.kind == kind.value]
    if index is not None:
        where.append(RunShard.index == index)
    with engine.connect() as conn:
        rows = conn.execute(select(RunShard.run_id, RunShard.kind, RunShard.index, RunShard.doc_start,
                                   RunShard.doc_stop, RunShard.tokens, RunShard.status, RunShard.attempts,
                                   RunShard.byte_offset).where(*where).order_by(RunShard.index)).all()
    return [Shard(*r) for r in rows]


def plan_ablation(engine: Engine, run_id: int, cuts: Sequence[ShardPlan]) -> None:
    """Insert the run's ablation shards once (a resume finds them planned and keeps them)."""
    with session_scope(engine) as s:
        have = s.scalar(select(func.count()).select_from(RunShard).where(
            RunShard.run_id == run_id, RunShard.kind == ShardKind.ablation.value))
        if have:
            return
        if cuts:
            s.execute(insert(RunShard), [
                {"run_id": run_id, "kind": ShardKind.ablation.value, "index": i, "doc_start": c.doc_start,
                 "doc_stop": c.doc_stop, "tokens": c.tokens} for i, c in enumerate(cuts)])


def claim(engine: Engine, shard: Shard, holder: str, *, lease_s: float, max_attempts: int,
          locked: bool = False) -> int:
    """Take ``shard`` for a new attempt (pending, or running with an expired lease); returns the
    attempt number. Raises ShardFailed once it has used ``max_attempts``, StaleLease if it is held
    by a live lease or already done.

    ``locked``: the caller holds the shard's liveness lock (``lock_shard``, queue-driven runs), so a
    ``running`` shard's holder is dead whatever its lease says: it is taken over at once."""
    with session_scope(engine) as s:
        row = s.get(RunShard, (shard.run_id, shard.kind, shard.index), with_for_update=True)
        if row is None:
            raise RunStateError(f"run {shard.run_id} has no {shard.kind} shard {shard.index}")
        now: datetime = s.execute(select(func.now())).scalar_one()
        if row.status == ShardStatus.done.value:
            raise StaleLease(f"{shard.kind} shard {shard.index} of run {shard.run_id} is done already")
        if (not locked and row.status == ShardStatus.running.value and row.lease_expires_at is not None
                and row.lease_expires_at > now):
            raise StaleLease(f"{shard.kind} shard {shard.index} of run {shard.run_id} is held by {row.holder}")
        if row.status == ShardStatus.failed.value or row.attempts >= max_attempts:
            row.status = ShardStatus.failed.value
            raise ShardFailed(f"{shard.kind} shard {shard.index} failed {row.attempts} time(s): {row.error or 'lost'}")
        row.attempts += 1
        row.status, row.holder = ShardStatus.running.value, holder
        row.lease_expires_at = now + _seconds(lease_s)
        row.started_at, row.finished_at, row.done_tokens = now, None, 0
        return row.attempts


def _seconds(s: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=s)


def _held(shard: Shard, attempt: int) -> Any:
    return ((RunShard.run_id == shard.run_id) & (RunShard.kind == shard.kind) & (RunShard.index == shard.index)
            & (RunShard.attempts == attempt) & (RunShard.status == ShardStatus.running.value))


def renew(engine: Engine, shard: Shard, attempt: int, *, lease_s: float, done_tokens: int) -> bool:
    """Extend the attempt's lease and record its progress; False once it lost the shard."""
    with session_scope(engine) as s:
        got = s.execute(update(RunShard).where(_held(shard, attempt)).values(
            lease_expires_at=func.now() + _seconds(lease_s), done_tokens=done_tokens).returning(RunShard.index))
        return got.first() is not None


def complete(engine: Engine, shard: Shard, attempt: int, payloads: Mapping[int, bytes], seconds: float,
             then: tuple[RunStep, RunStep] | None = None) -> bool:
    """Write the shard's state (layer -> bytes) and mark it done, in one transaction, if and only if
    ``attempt`` still holds it and the run was not cancelled; otherwise raise StaleLease (or
    RunCancelled) and write nothing.

    ``then`` = (step, next step): the barrier of a queue-driven run. In the same transaction, under
    the run row's lock (so two last shards cannot both miss each other), the completion that leaves
    no shard of its kind unfinished moves the run from ``step`` to the next one and returns True:
    exactly one completion sends the next step's message."""
    with session_scope(engine) as s:
        got = s.execute(update(RunShard).where(_held(shard, attempt)).values(
            status=ShardStatus.done.value, finished_at=func.now(), seconds=seconds, lease_expires_at=None,
            done_tokens=RunShard.tokens, error=None,
            state_bytes=sum(len(p) for p in payloads.values())).returning(RunShard.index)).first()
        if got is None:
            raise StaleLease(f"{shard.kind} shard {shard.index} of run {shard.run_id}: attempt {attempt} lost its "
                             "lease to a newer attempt; its state was not written")
        s.execute(delete(ShardState).where(ShardState.run_id == shard.run_id, ShardState.kind == shard.kind,
                                           ShardState.index == shard.index))
        if payloads:
            s.execute(insert(ShardState), [
                {"run_id": shard.run_id, "kind": shard.kind, "index": shard.index, "layer": layer, "payload": p}
                for layer, p in payloads.items()])
        # the run row last (locks: shard row, then run row, as everywhere a shard is finished)
        status, step = s.execute(select(ExtractionRun.status, ExtractionRun.step)
                                 .where(ExtractionRun.id == shard.run_id).with_for_update()).one()
        if status == RunStatus.cancelled:
            raise RunCancelled(f"run {shard.run_id} was cancelled; {shard.kind} shard {shard.index}'s state was dropped")
        if then is None or status != RunStatus.running or step != then[0].value:
            return False
        left = s.scalar(select(func.count()).select_from(RunShard).where(
            RunShard.run_id == shard.run_id, RunShard.kind == shard.kind, RunShard.status != ShardStatus.done.value))
        if left:
            return False
        _move(s, shard.run_id, then[1])
        return True


def fail_attempt(engine: Engine, shard: Shard, attempt: int, error: BaseException, *, max_attempts: int) -> bool:
    """Record a failed attempt; the shard goes back to pending, or to failed once it used
    ``max_attempts``. Returns True when it failed for good."""
    with session_scope(engine) as s:
        row = s.get(RunShard, (shard.run_id, shard.kind, shard.index), with_for_update=True)
        if row is None or row.attempts != attempt or row.status != ShardStatus.running.value:
            return False  # another attempt owns it now
        final = row.attempts >= max_attempts
        row.status = ShardStatus.failed.value if final else ShardStatus.pending.value
        row.error, row.holder, row.lease_expires_at = one_line(error)[:2000], None, None
        row.finished_at = datetime.now(UTC)
        return final


def shard_seconds(engine: Engine, run_id: int) -> dict[str, float]:
    """The corpus pass and ablation times as the sum of their shards' final attempts."""
    with engine.connect() as conn:
        rows = conn.execute(select(RunShard.kind, func.coalesce(func.sum(RunShard.seconds), 0.0))
                            .where(RunShard.run_id == run_id).group_by(RunShard.kind)
                            .order_by(RunShard.kind.desc())).all()  # the pass, then the ablation: stage order
    names = {ShardKind.pass_.value: "corpus_pass", ShardKind.ablation.value: "ablation"}
    return {names[k]: float(v or 0.0) for k, v in rows}


def add_timings(engine: Engine, run_id: int, timings: Mapping[str, float]) -> None:
    """Merge figures into the run's stored timings (a queue-driven run's steps each add theirs)."""
    with session_scope(engine) as s:
        run = s.get(ExtractionRun, run_id, with_for_update=True)
        if run is not None:
            run.timings = {**(run.timings or {}), **timings}


def states(engine: Engine, run_id: int, kind: ShardKind, layer: int) -> Iterator[tuple[int, bytes]]:
    """(shard index, payload) of every done shard's state for ``layer``, in shard order."""
    with engine.connect() as conn:
        rows = conn.execute(select(ShardState.index, ShardState.payload)
                            .join(RunShard, (RunShard.run_id == ShardState.run_id) & (RunShard.kind == ShardState.kind)
                                  & (RunShard.index == ShardState.index))
                            .where(ShardState.run_id == run_id, ShardState.kind == kind.value,
                                   ShardState.layer == layer, RunShard.status == ShardStatus.done.value)
                            .order_by(ShardState.index))
        for index, payload in rows:
            yield int(index), bytes(payload)


# --- publishing --------------------------------------------------------------------------------


def publish(s: Session, run_id: int, *, entry: Mapping[str, Any], run: Mapping[str, Any], fence: Any = None) -> None:
    """Inside the transaction that wrote the catalog rows: make the run its entry's current catalog.

    Refuses (RunCancelled) a run cancelled meanwhile. ``entry``/``run``: columns to set.
    """
    row = s.get(ExtractionRun, run_id, with_for_update=True)
    if row is None:
        raise RunStateError(f"run {run_id} is gone")
    if row.status == RunStatus.cancelled:
        raise RunCancelled(f"run {run_id} was cancelled")
    if row.status != RunStatus.running:
        raise RunStateError(f"run {run_id} is {row.status.value}; not publishing it")
    model = s.get(CatalogModel, row.model_id)
    assert model is not None
    for k, v in entry.items():
        setattr(model, k, v)
    s.execute(update(ExtractionRun)
              .where(ExtractionRun.model_id == model.id, ExtractionRun.status == RunStatus.complete)
              .values(status=RunStatus.superseded))
    for k, v in run.items():
        setattr(row, k, v)
    row.status, row.step, row.finished_at = RunStatus.complete, RunStep.done.value, datetime.now(UTC)
    model.current_run_id = run_id
    s.execute(delete(ShardState).where(ShardState.run_id == run_id))  # published: the states are spent
    if fence is not None:
        s.flush()
        fence.publishing(s, run_id)


def drop_superseded(engine: Engine, name: str) -> None:
    """Delete the runs a publish replaced, with their rows (cascade): invisible already.

    Failed, interrupted and cancelled runs stay, with their error; they never had catalog rows.
    """
    with session_scope(engine) as s:
        model = s.scalar(select(CatalogModel).where(CatalogModel.name == name))
        if model is None:
            return
        s.execute(delete(ExtractionRun).where(ExtractionRun.model_id == model.id,
                                              ExtractionRun.status == RunStatus.superseded))


# --- queue-driven runs (part 9) ----------------------------------------------------------------
#
# No process drives such a run: each shard and each step (merge, finish) is a task of its own.
# Liveness is per task: an attempt holds its shard's advisory lock (a step: the run's) on a
# connection of its own for as long as it runs, so a worker that dies frees it at once, and a
# redelivered message that finds the lock free takes the work over (the attempt number fences the
# dead attempt's late writes). Nothing is ever waited for in the broker: ``stranded`` finds the
# work whose message was lost or whose worker died, from these rows alone.

_KIND_BIT = {ShardKind.pass_.value: 0, ShardKind.ablation.value: 1}
STEP_OF_KIND = {ShardKind.pass_.value: (RunStep.pass_, RunStep.merge),
                ShardKind.ablation.value: (RunStep.ablation, RunStep.finish)}
KIND_OF_STEP = {RunStep.pass_.value: ShardKind.pass_, RunStep.ablation.value: ShardKind.ablation}


def shard_lock_key(run_id: int, kind: str, index: int) -> int:
    """The shard's one-bigint advisory key (pg_locks: classid = run id, objid = the low half,
    objsubid 1, so it never meets the two-int keys above)."""
    return (run_id << 32) | (_KIND_BIT[kind] << 31) | index


def _try_lock(conn: Connection, sql: str, params: Mapping[str, Any]) -> bool:
    held = bool(conn.scalar(text(sql), params))
    conn.commit()
    return held


def lock_shard(conn: Connection, run_id: int, kind: str, index: int) -> bool:
    """Take the shard's liveness lock on ``conn`` (session level); False when a live attempt has it."""
    return _try_lock(conn, "SELECT pg_try_advisory_lock(:k)", {"k": shard_lock_key(run_id, kind, index)})


def shard(engine: Engine, run_id: int, kind: str, index: int) -> Shard | None:
    found = shards(engine, run_id, ShardKind(kind), index)
    return found[0] if found else None


def _move(s: Session, run_id: int, step: RunStep) -> None:
    s.execute(update(ExtractionRun).where(ExtractionRun.id == run_id).values(
        step=step.value, step_holder=None, step_sent_at=None, step_attempts=0))


def advance(engine: Engine, run_id: int, frm: RunStep, to: RunStep) -> bool:
    """Compare-and-set the step of a running run; True when this call moved it."""
    with session_scope(engine) as s:
        row = s.execute(select(ExtractionRun.status, ExtractionRun.step).where(ExtractionRun.id == run_id)
                        .with_for_update()).one_or_none()
        if row is None or row[0] != RunStatus.running or row[1] != frm.value:
            return False
        _move(s, run_id, to)
        return True


def begin_step(conn: Connection, engine: Engine, run_id: int, step: RunStep, holder: str,
               max_attempts: int) -> str | None:
    """Start a queue-driven run's ``step`` (merge or finish) on ``conn``: take the run's liveness
    lock and count the attempt. None when this task should run it (the lock is then held); else
    why not (a duplicate, a step already past, a stopped run), with the lock not held.

    A step started ``max_attempts`` times whose worker died each time fails the run."""
    if not _try_lock(conn, "SELECT pg_try_advisory_lock(:c, :r)", {"c": RUN_LOCK_CLASS, "r": run_id}):
        return "another live worker runs this step"
    why: str | None = None
    with session_scope(engine) as s:
        run = s.get(ExtractionRun, run_id, with_for_update=True)
        if run is None:
            why = "the run is gone"
        elif run.status != RunStatus.running:
            why = f"the run is {run.status.value}"
        elif run.step != step.value:
            why = f"the run is at step {run.step}"
        elif run.step_attempts >= max_attempts:
            run.status, run.finished_at = RunStatus.failed, datetime.now(UTC)
            run.error = (f"gave up: step {step.value} was started {run.step_attempts} times and its worker died "
                         "each time (killed, out of memory or lost); nothing was published")
            why = run.error
        else:
            run.step_attempts += 1
            run.step_holder = holder
    if why is not None:
        release(conn)
    return why


def step_failed(engine: Engine, run_id: int, step: RunStep, error: BaseException) -> None:
    """A step raised (not a dead worker): the run fails with its error."""
    fail(engine, run_id, False, error)


@dataclass(frozen=True)
class Dispatch:
    """Messages to send for a queue-driven run: shard (kind, index) pairs, or one step."""

    run_id: int
    shards: tuple[tuple[str, int], ...] = ()
    step: str | None = None


def _held_sql(key_sql: str, twoint: bool = False) -> str:
    if twoint:
        match = f"l.objsubid = 2 AND l.classid::bigint = {RUN_LOCK_CLASS} AND l.objid::bigint = {key_sql}"
    else:
        match = (f"l.objsubid = 1 AND l.classid::bigint = (({key_sql}) >> 32) "
                 f"AND l.objid::bigint = (({key_sql}) & 4294967295)")
    return f"""EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND {match})"""


_SHARD_KEY_SQL = "((sh.run_id::bigint << 32) | (CASE sh.kind WHEN 'ablation' THEN 2147483648 ELSE 0 END) | sh.index)"

# Rows another transaction holds (a shard being finished, a run being published) are skipped, not
# waited for: a sweep never stalls behind live work, and a skipped piece is looked at next time.
STRANDED_SHARDS_SQL = f"""
WITH found AS (
  SELECT sh.run_id, sh.kind, sh.index FROM run_shards sh JOIN extraction_runs r ON r.id = sh.run_id
  WHERE r.status = 'running' AND r.driver = 'queue'
    AND sh.kind = (CASE r.step WHEN 'pass' THEN 'pass' WHEN 'ablation' THEN 'ablation' END)
    AND sh.status IN ('pending', 'running')
    AND (CAST(:run_id AS integer) IS NULL OR r.id = CAST(:run_id AS integer))
    AND NOT {_held_sql(_SHARD_KEY_SQL)}
    AND (sh.status = 'running' OR sh.sent_at IS NULL OR sh.sent_at < now() - make_interval(secs => :again))
  FOR UPDATE OF sh SKIP LOCKED
)
UPDATE run_shards AS u SET sent_at = now(), status = 'pending', holder = NULL, lease_expires_at = NULL
FROM found WHERE u.run_id = found.run_id AND u.kind = found.kind AND u.index = found.index
RETURNING u.run_id, u.kind, u.index
"""

STRANDED_STEPS_SQL = f"""
WITH found AS (
  SELECT r.id FROM extraction_runs r
  WHERE r.status = 'running' AND r.driver = 'queue' AND r.step IN ('merge', 'finish')
    AND (CAST(:run_id AS integer) IS NULL OR r.id = CAST(:run_id AS integer))
    AND NOT {_held_sql('r.id', twoint=True)}
    AND (r.step_holder IS NOT NULL OR r.step_sent_at IS NULL
         OR r.step_sent_at < now() - make_interval(secs => :again))
  FOR UPDATE OF r SKIP LOCKED
)
UPDATE extraction_runs AS u SET step_sent_at = now(), step_holder = NULL
FROM found WHERE u.id = found.id
RETURNING u.id, u.step
"""


def stranded(conn: Connection, again_s: float, run_id: int | None = None) -> list[Dispatch]:
    """Inside the caller's transaction: mark as sent, and return, the work of queue-driven runs that
    no live task holds and whose message is lost: a shard or step whose worker died (its lock is
    free but it was started), one never sent, or one sent longer than ``again_s`` ago and still not
    taken (a message the broker lost). Several sweepers at once return each piece once (the row
    updates serialise them); an extra message is harmless, as every task is idempotent."""
    params = {"again": float(again_s), "run_id": run_id}
    out: dict[int, Dispatch] = {}
    # UPDATE ... RETURNING has no order: the pieces go out in shard order
    for rid, kind, index in sorted(conn.execute(text(STRANDED_SHARDS_SQL), params).tuples()):
        d = out.get(rid, Dispatch(rid))
        out[rid] = Dispatch(rid, (*d.shards, (kind, int(index))), d.step)
    for rid, step in conn.execute(text(STRANDED_STEPS_SQL), params):
        d = out.get(rid, Dispatch(rid))
        out[rid] = Dispatch(rid, d.shards, step)
    return [out[k] for k in sorted(out)]


def requeue(engine: Engine, run_id: int, sender: Any) -> tuple[int, list[Dispatch]]:
    """``runs resume`` of a queue-driven run: set it running again (failed shards and the step get
    their attempts back) and send every unfinished piece that no live task holds, in one
    transaction (no sweeper sees it half done). Returns how many shards are done already and what
    was sent."""
    with engine.begin() as conn, Session(bind=conn) as s:
        run = s.get(ExtractionRun, run_id, with_for_update=True)
        if run is None:
            raise RunStateError(f"no run {run_id} (see `neuron-catalog runs`)")
        if run.status not in (*RESUMABLE, RunStatus.running):
            raise RunStateError(f"run {run_id} is {run.status.value}: only a running, interrupted or failed run resumes")
        s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.status == ShardStatus.failed.value)
                  .values(status=ShardStatus.pending.value, attempts=0, holder=None, lease_expires_at=None))
        # every unfinished shard and the step go out again (a duplicate of a live one does nothing)
        s.execute(update(RunShard).where(RunShard.run_id == run_id, RunShard.status != ShardStatus.done.value)
                  .values(sent_at=None))
        run.status, run.error, run.finished_at = RunStatus.running, None, None
        run.step_sent_at, run.step_attempts = None, 0
        kept = int(s.scalar(select(func.count()).select_from(RunShard).where(
            RunShard.run_id == run_id, RunShard.status == ShardStatus.done.value)) or 0)
        s.flush()
        return kept, _send(conn, sender, 0.0, run_id)


def dispatch(engine: Engine, sender: Any, run_id: int | None = None, again_s: float | None = None) -> list[Dispatch]:
    """Send every piece of queue-driven runs (one run, or all) that is unsent, lost or whose
    worker died; the messages go out before the commit, so a send that fails leaves them for the
    next sweep."""
    again = float(settings.visibility_timeout_s if again_s is None else again_s)
    with engine.begin() as conn:
        return _send(conn, sender, again, run_id)


def _send(conn: Connection, sender: Any, again_s: float, run_id: int | None) -> list[Dispatch]:
    found = stranded(conn, again_s, run_id)
    for d in found:
        for kind, index in d.shards:
            sender.shard(d.run_id, kind, index)
        if d.step is not None:
            sender.step(d.run_id, d.step)
    return found
