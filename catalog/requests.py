"""Distributed extraction (part 7): ``extract --distributed`` queues a request, a Celery worker runs it.

A request is one row of ``extraction_requests``; the Celery message carries only its id (the task id
is the request id too), so a message can be delivered any number of times::

    queued --(a worker claims it: attempts + 1)--> running --(its run is published)--> published
                                                      |--(a real error: bad corpus, bad model)--> failed
                                                      |--(its worker died; a sweeper re-sends it)--> running
                                                      \\--(started request_max_attempts times)--> failed

Delivery is at least once (late acks, and each worker's sweeper re-sending what a dead worker held);
publication is exactly once:

* Liveness: a worker runs a request only while holding a session-level advisory lock keyed by its
  id, on a connection of its own with TCP keepalives at both ends. The lock lives exactly as long as
  that database session, so a worker that dies (SIGKILL, OOM, a lost machine) frees it; a delivery
  that finds it taken acks and does nothing (a live holder exists: a duplicate or a redelivery).
* Fencing: claiming increments ``attempts``; the attempt number and holder are the fencing token.
  The run's registration and, above all, the commit that publishes the catalog update the request
  only ``WHERE status = 'running' AND attempts = <mine> AND holder = <me>``, in the same transaction
  as the catalog change (``catalog.runs.schemas.Fence``): an attempt that lost its claim (its session
  dropped and another attempt started) cannot publish, and a request is marked ``published`` in the
  very commit that makes its catalog current.
* Recovery: a ``running`` request whose lock is free has a dead holder; each worker's sweeper finds
  those (reading ``pg_locks``, never taking the lock, so it cannot make a real delivery back off) and
  re-sends the task. Redelivered messages of a worker that vanished only come back after Redis's
  visibility timeout; the sweeper does not wait for it.

Nothing here imports torch or Celery: ``catalog.runs.local`` is imported only to run a request, and
``workers/`` passes in how to send a task.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.runs.lifecycle import holder_name
from catalog.store import migrate
from catalog.store.database import get_engine, private_engine, worker_engine
from catalog.store.models import (
    REQUEST_DONE,
    CatalogModel,
    ExtractionRequest,
    ExtractionRun,
    RequestStatus,
)

if TYPE_CHECKING:
    from catalog.runs.schemas import ExtractRequest, Sender

logger = logging.getLogger(__name__)

# First key of the two-int advisory lock a live attempt holds (the second is the request id).
REQUEST_LOCK_CLASS = 0x4E52  # "NR"; runs use 0x4E43 ("NC"), catalog.runs.lifecycle
# How often `extract --distributed` reads the request's row while following it.
FOLLOW_POLL_S = 0.5


class FenceLost(RuntimeError):
    """This attempt no longer holds the request (another attempt took it over, or it was finished)."""


class Outcome(StrEnum):
    """What one delivery of a request did."""

    published = "published"
    planned = "planned"  # its run is registered and its shards are queued (part 9)
    failed = "failed"  # marked failed: a real error, an unreadable request, or attempts used up
    gave_up = "gave up"  # marked failed: started max times, its worker died each time
    held = "held"  # a live holder has it: this delivery is a duplicate
    done = "done"  # already published, failed or cancelled
    missing = "missing"  # no such request (deleted)
    fenced = "fenced"  # this attempt lost its claim before publishing; the holder now publishes


def gave_up_message(attempts: int) -> str:
    return (f"gave up: the extraction was started {attempts} times and its worker died each time "
            "(killed, out of memory or lost) before finishing; nothing was published "
            f"(CATALOG_REQUEST_MAX_ATTEMPTS={settings.request_max_attempts})")


# Errors a user caused (a bad path, an unsupported model, a bad corpus): their message alone says it.
_USER_ERRORS = ("CorpusError", "ModelSourceError", "UnsupportedArchitecture", "BosError", "DatabaseUnavailable",
                "SchemaMismatch")


def one_line(exc: BaseException) -> str:
    """The error as the request's one-line ``error`` (the type named unless it is a user error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    name = type(exc).__name__
    if name in _USER_ERRORS and first:
        return first[:2000]
    return (f"{name}: {first}" if first else name)[:2000]


# --- the client side ---------------------------------------------------------------------------


def create(request: dict[str, Any], engine: Engine | None = None) -> int:
    """Insert a queued request (``dataclasses.asdict(ExtractRequest)``); returns its id."""
    engine = engine or get_engine()
    with engine.begin() as conn:
        return int(conn.execute(insert(ExtractionRequest).values(request=request).returning(ExtractionRequest.id))
                   .scalar_one())


def mark_failed(request_id: int, error: str, engine: Engine | None = None) -> None:
    """Fail a request that no worker holds (e.g. its message could not be sent)."""
    engine = engine or get_engine()
    with engine.begin() as conn:
        conn.execute(
            update(ExtractionRequest)
            .where(ExtractionRequest.id == request_id, ExtractionRequest.status.not_in(REQUEST_DONE))
            .values(status=RequestStatus.failed, error=error[:2000], finished_at=func.now(), updated_at=func.now())
        )


def _held_sql(request_id_sql: str) -> str:
    """SQL: whether some session of this database holds the request's lock (read from pg_locks:
    looking never takes the lock, so it never makes a real delivery back off)."""
    return f"""EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint = {REQUEST_LOCK_CLASS} AND l.objid::bigint = {request_id_sql})"""


@dataclass(frozen=True)
class RequestView:
    """A request as its follower sees it."""

    id: int
    status: str
    attempts: int
    holder: str | None
    run_id: int | None
    stage: str | None  # the run's progress stage
    error: str | None
    live: bool  # its lock is held (a running request without it lost its worker)

    def describe(self) -> str:
        """One progress line."""
        head = f"request {self.id}"
        if self.status == RequestStatus.queued:
            return f"{head}: queued, waiting for a worker"
        if self.status == RequestStatus.running:
            if self.run_id is not None:
                return f"{head}: planned as run {self.run_id}; its shards are queued"
            if not self.live:
                return (f"{head}: attempt {self.attempts} on {self.holder} lost (its worker died); "
                        "waiting for another worker to take it over")
            return f"{head}: running on {self.holder} (attempt {self.attempts}), stage: {self.stage or 'starting'}"
        if self.status == RequestStatus.published:
            return f"{head}: published (run {self.run_id}, attempt {self.attempts})"
        return f"{head}: {self.status}" + (f": {self.error}" if self.error else "")


def view(request_id: int, engine: Engine | None = None) -> RequestView | None:
    engine = engine or get_engine()
    with engine.connect() as conn:
        row = conn.execute(text(f"""
            SELECT r.status, r.attempts, r.holder, r.run_id, x.progress ->> 'stage', r.error, {_held_sql('r.id')}
            FROM extraction_requests r LEFT JOIN extraction_runs x ON x.id = r.run_id
            WHERE r.id = :id"""), {"id": request_id}).one_or_none()
    return None if row is None else RequestView(request_id, *row)


def follow(request_id: int, on_change: Callable[[RequestView], None], engine: Engine | None = None,
           poll_s: float = FOLLOW_POLL_S, until_planned: bool = False) -> RequestView:
    """Read the request until it is published, failed or cancelled (``until_planned``: or its run is
    registered), calling ``on_change`` whenever what a user sees of it changes; returns its last state."""
    import time

    engine = engine or get_engine()
    last: RequestView | None = None
    while True:
        now = view(request_id, engine)
        if now is None:
            raise LookupError(f"request {request_id} does not exist")
        if now != last:
            on_change(now)
            last = now
        if now.status in REQUEST_DONE or (until_planned and now.run_id is not None):
            return now
        time.sleep(poll_s)


@dataclass(frozen=True)
class Published:
    """What the in-process extract prints about its run, as the publishing commit recorded it."""

    name: str
    n_layers: int
    d_mlp: int
    run_id: int
    timings: dict[str, float]


def published(request_id: int, engine: Engine | None = None) -> Published | None:
    """The summary of a published request's run (None unless published)."""
    with Session(engine or get_engine()) as s:
        result = s.scalar(select(ExtractionRequest.result).where(ExtractionRequest.id == request_id))
    if not result:
        return None
    return Published(result["name"], int(result["n_layers"]), int(result["d_mlp"]), int(result["run_id"]),
                     {str(k): float(v) for k, v in result["timings"]})


def recent(session: Session, limit: int = 50) -> list[ExtractionRequest]:
    """The latest requests, oldest first (``neuron-catalog runs``)."""
    rows = session.scalars(select(ExtractionRequest).order_by(ExtractionRequest.id.desc()).limit(limit)).all()
    return list(reversed(rows))


# --- the worker side ---------------------------------------------------------------------------


def request_from_message(request: dict[str, Any]) -> ExtractRequest:
    """The inverse of ``dataclasses.asdict(ExtractRequest(...))``; unknown keys raise ``TypeError``.

    Parameters the message leaves out come from this worker's settings (``CATALOG_*``), not from
    the dataclass defaults.
    """
    from catalog.runs.schemas import ExtractRequest

    return ExtractRequest.from_json(dict(request, params=request.get("params") or {}))


def _mine(request_id: int, attempt: int, holder: str) -> Any:
    return ((ExtractionRequest.id == request_id) & (ExtractionRequest.status == RequestStatus.running)
            & (ExtractionRequest.attempts == attempt) & (ExtractionRequest.holder == holder))


@dataclass(frozen=True)
class RequestFence:
    """``catalog.runs.schemas.Fence`` for one attempt: both updates apply only while the attempt still holds
    the request, in the transaction that registers / publishes the run."""

    request_id: int
    attempt: int
    holder: str

    def _update(self, session: Session, what: str, **values: Any) -> None:
        result = session.execute(
            update(ExtractionRequest).where(_mine(self.request_id, self.attempt, self.holder))
            .values(updated_at=func.now(), **values).execution_options(synchronize_session=False)
        )
        n = cast(CursorResult[Any], result).rowcount
        if n != 1:
            raise FenceLost(f"request {self.request_id}: attempt {self.attempt} on {self.holder} no longer holds it; "
                            f"not {what}")

    def registered(self, session: Session, run_id: int) -> None:
        self._update(session, "starting its run", run_id=run_id)

    def publishing(self, session: Session, run_id: int) -> None:
        self._update(session, "publishing", status=RequestStatus.published, run_id=run_id, error=None,
                     result=_result(session, run_id), finished_at=func.now())


class RunRequestFence:
    """``Fence`` for a queue-driven run's finish step: the publishing commit marks the request that
    planned the run published, with the summary ``extract --distributed`` prints (no request: no-op)."""

    def registered(self, session: Session, run_id: int) -> None:
        return None

    def publishing(self, session: Session, run_id: int) -> None:
        session.execute(
            update(ExtractionRequest)
            .where(ExtractionRequest.run_id == run_id, ExtractionRequest.status.not_in(REQUEST_DONE))
            .values(status=RequestStatus.published, error=None, result=_result(session, run_id),
                    finished_at=func.now(), updated_at=func.now())
            .execution_options(synchronize_session=False))


def _result(session: Session, run_id: int) -> dict[str, Any]:
    # the session's own (just filled) objects: run.timings still has its keys in stage order
    run = session.get(ExtractionRun, run_id)
    entry = None if run is None else session.get(CatalogModel, run.model_id)
    assert run is not None and entry is not None
    return {"run_id": run_id, "name": entry.name, "n_layers": entry.n_layers, "d_mlp": entry.d_mlp,
            "timings": [[k, v] for k, v in run.timings.items() if k != "total"]}


def settle(engine: Engine, run_id: int) -> None:
    """A queue-driven run ended failed or cancelled: so does the request that planned it."""
    with engine.begin() as conn:
        conn.execute(text("""
            UPDATE extraction_requests r SET status = x.status::text, error = x.error,
                   finished_at = now(), updated_at = now()
            FROM extraction_runs x
            WHERE x.id = :run AND r.run_id = x.id AND r.status IN ('queued', 'running')
              AND x.status IN ('failed', 'cancelled')"""), {"run": run_id})


def _claim(conn: Any, request_id: int, holder: str) -> tuple[int, dict[str, Any]] | Outcome:
    """With the request's lock held: start a new attempt (returns its number and the request), or
    say why not."""
    with conn.begin():
        row = conn.execute(
            select(ExtractionRequest.status, ExtractionRequest.attempts, ExtractionRequest.request,
                   ExtractionRequest.run_id)
            .where(ExtractionRequest.id == request_id).with_for_update()
        ).one_or_none()
        if row is None:
            return Outcome.missing
        status, attempts, request, run_id = row
        if status in REQUEST_DONE:
            return Outcome.done
        if run_id is not None:  # planned: its run goes on shard by shard (catalog/runs/queued.py)
            return Outcome.planned
        if attempts >= settings.request_max_attempts:
            # every earlier attempt started and never finished: its worker died (it did not fail: a
            # real error marks the request failed at once)
            conn.execute(update(ExtractionRequest).where(ExtractionRequest.id == request_id).values(
                status=RequestStatus.failed, error=gave_up_message(attempts), finished_at=func.now(),
                updated_at=func.now()))
            return Outcome.gave_up
        conn.execute(update(ExtractionRequest).where(ExtractionRequest.id == request_id).values(
            status=RequestStatus.running, attempts=attempts + 1, holder=holder, run_id=None, error=None,
            started_at=func.now(), updated_at=func.now(), resent_at=None))
        return attempts + 1, request


def _fail_attempt(engine: Engine, request_id: int, attempt: int, holder: str, error: str) -> None:
    with engine.begin() as conn:  # fenced too: a request another attempt took over is left to it
        conn.execute(update(ExtractionRequest).where(_mine(request_id, attempt, holder)).values(
            status=RequestStatus.failed, error=error[:2000], finished_at=func.now(), updated_at=func.now()))


def run_request(request_id: int, *, sender: Sender, url: str | None = None,
                log: Callable[[str], None] = logger.info) -> Outcome:
    """Run one delivery of a request (the worker task's body).

    Checks the schema revision (workers never migrate), takes the request's lock (a live holder:
    ``held``), claims a new attempt, plans the run with the fence and sends its shards
    (catalog/runs/queued.py), and returns how that ended. A real error
    marks the request failed with its one-line message (and, unless it is a user's error such as a
    missing corpus, is re-raised for the worker's log to show its traceback); a BaseException (the
    worker shutting down) leaves it ``running`` and unlocked, for the sweeper to re-send.
    """
    from catalog.store.database import database_url

    url = url or database_url()
    try:
        migrate.require_head(url)
    except migrate.SchemaMismatch as exc:
        # Tell the user waiting on it rather than leave it queued; best effort, as the schema differs.
        try:
            mark_failed(request_id, f"{exc} ({holder_name()})", private_engine(url))
        except Exception:  # noqa: BLE001
            logger.warning("request %s: could not be marked failed on a database of another schema", request_id)
        raise
    holder = holder_name()
    liveness = private_engine(url).connect()  # the attempt's lock lives as long as this session
    try:
        held = bool(liveness.scalar(text("SELECT pg_try_advisory_lock(:c, :r)"),
                                    {"c": REQUEST_LOCK_CLASS, "r": request_id}))
        liveness.commit()
        if not held:
            log(f"request {request_id}: another live worker holds it; this delivery is a duplicate")
            return Outcome.held
        claim = _claim(liveness, request_id, holder)
        if isinstance(claim, Outcome):
            log(f"request {request_id}: {claim.value}; nothing to do" if claim is not Outcome.gave_up
                else f"request {request_id}: {gave_up_message(settings.request_max_attempts)}")
            return claim
        attempt, message = claim
        engine = worker_engine(url)
        try:
            req = request_from_message(message)
        except (TypeError, ValueError) as exc:  # written by another version of the code
            _fail_attempt(engine, request_id, attempt, holder, f"cannot read the request: {one_line(exc)}")
            return Outcome.failed
        log(f"request {request_id}: attempt {attempt} on {holder}: planning {req.model}")
        from catalog.runs import queued

        try:
            run_id = queued.plan(req, engine, RequestFence(request_id, attempt, holder), sender, log=log)
        except FenceLost as exc:
            log(str(exc))
            return Outcome.fenced
        except Exception as exc:
            _fail_attempt(engine, request_id, attempt, holder, one_line(exc))
            if type(exc).__name__ in _USER_ERRORS:  # the user's to fix: one line, no traceback
                logger.warning("request %s failed: %s", request_id, one_line(exc))
                return Outcome.failed
            raise  # a bug: the worker's log gets the traceback
        log(f"request {request_id}: run {run_id} planned; its shards are queued")
        return Outcome.planned
    finally:
        liveness.close()  # no pool: the session ends, and its lock with it


SWEEP_SQL = f"""
UPDATE extraction_requests AS r SET resent_at = now(), updated_at = now()
WHERE r.status = 'running' AND r.run_id IS NULL
  AND (r.resent_at IS NULL OR r.resent_at < now() - make_interval(secs => :again))
  AND NOT {_held_sql('r.id')}
RETURNING r.id
"""


def sweep(engine: Engine, send: Callable[[int], None]) -> list[int]:
    """Re-send the running requests whose holder died (their lock is free); returns their ids.

    Each is re-sent once per lost attempt (and again after the visibility timeout if nobody took it
    meanwhile): several sweepers at once re-send it once, as the row update serialises them. The
    messages go out before the commit: a send that fails leaves the request for the next sweep.
    """
    with engine.begin() as conn:
        ids = [int(i) for i in conn.scalars(text(SWEEP_SQL), {"again": float(settings.visibility_timeout_s)})]
        for request_id in ids:
            send(request_id)
    return ids


class Sweeper:
    """A daemon thread sweeping every ``interval_s`` (first at once), on an engine without a pool:
    re-sends the requests whose worker died, then calls each of ``also`` (the queue-driven runs'
    stranded shards and steps, catalog/runs/queued.py) with the same engine."""

    def __init__(self, send: Callable[[int], None], interval_s: float | None = None, url: str | None = None,
                 also: tuple[Callable[[Engine], list[Any]], ...] = ()) -> None:
        self.send = send
        self.also = also
        self.interval_s = settings.sweep_interval_s if interval_s is None else interval_s
        self.url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="request-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        from catalog.store.database import database_url

        failing = False
        while True:
            try:
                engine = private_engine(self.url or database_url())
                ids = sweep(engine, self.send)
                if ids:
                    logger.warning("re-sent request(s) %s: their worker died mid-run", ", ".join(map(str, ids)))
                for more in self.also:
                    found = more(engine)
                    if found:
                        logger.warning("re-sent the stranded pieces of queued runs: %s", found)
                failing = False
            except Exception as exc:  # noqa: BLE001  (a database or broker outage: try again next time)
                if not failing:
                    logger.warning("request sweep failed (retrying every %ss): %s", self.interval_s, one_line(exc))
                failing = True
            if self._stop.wait(self.interval_s):
                return
