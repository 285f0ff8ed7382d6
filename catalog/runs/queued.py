"""Queue-driven runs (part 9): the bodies of the Celery tasks that spread one run over any number
of workers, on this machine or others that reach the same Redis and Postgres.

A run is registered with driver ``queue`` and no process drives it. Each piece is a task that takes
ids only and re-reads everything from Postgres::

    plan (the request's task: load, cut the corpus into pass shards, register, send the shards)
      -> pass shard x N  --(the last completion moves step pass -> merge)-->  merge
      -> ablation shard x M  --(the last completion moves ablation -> finish)-->  finish (publish)

* The barrier is in Postgres, never in the broker (no chord): a shard's completion flips its row in
  the transaction that writes its state and, under the run row's lock, the completion that leaves
  none of its kind unfinished moves the run's ``step`` (compare-and-set) and sends the next step's
  message. Exactly one completion can do that; a lost message is found by ``lifecycle.stranded``.
* Every task is idempotent. A shard attempt holds the shard's advisory lock on a connection of its
  own while it runs: a second delivery meanwhile finds it held and does nothing; a delivery after it
  finished finds it done. A worker that died freed its lock, so the next delivery (Celery's
  ``reject_on_worker_lost``, or the sweep) takes the shard over with a new attempt number, and the
  dead attempt's late write, if any, is refused (fencing). The merge and finish steps hold the
  run's lock likewise; each counts its starts, and a piece that kills its worker
  ``CATALOG_SHARD_MAX_ATTEMPTS`` times fails the run instead of looping.
* A fatal device error (CUDA out of memory, a poisoned CUDA context) ends the worker process, for
  its pool (or supervisor) to start a fresh one; the shard goes back to the queue.

Each worker process keeps the last model it loaded, the run's corpus (checked against the run's
sha256 once) and the run's merged pass state, so a run's shards after the first cost no load; and
the window starts its pass shards kept, which its ablation shards of the run read instead of running
them (``CATALOG_ABLATION_START_CACHE_MB``; float32 rounding apart, the same figures).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from catalog.config import settings
from catalog.corpus import CorpusError, CorpusSource, open_corpus
from catalog.extract.ablation import StartCache
from catalog.loading import LoadedModel, load
from catalog.runs import lifecycle, sharded
from catalog.runs.lifecycle import dispatch
from catalog.runs.local import prepare, tidy
from catalog.runs.schemas import ExtractRequest, Fence, Sender
from catalog.store.database import private_engine, worker_engine
from catalog.store.models import ExtractionRun, RunStatus, RunStep, ShardKind

logger = logging.getLogger(__name__)

# How a worker process ends after a fatal device error: its pool starts a fresh process.
EXIT_DEVICE_ERROR = 70
_FATAL_DEVICE = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access",
                 "CUDA driver", "NCCL error")


def fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves this process's device unusable (out of memory, a poisoned context)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_DEVICE)


# --- what a worker process keeps between tasks ---------------------------------------------------

_models: dict[tuple[str, str | None], LoadedModel] = {}
_corpora: dict[int, CorpusSource] = {}
_merged: dict[int, sharded.Merged] = {}
# the window starts this process's pass shards kept (ablation.StartCache), for its ablation shards of
# the same run: one run at a time, dropped at its finish, its failure or another run's first shard
_starts: dict[int, StartCache | None] = {}


def model(spec: str, device: str | None) -> LoadedModel:
    """The model, loaded once per process and kept warm for the next task (one model at a time)."""
    key = (spec, device)
    if key not in _models:
        if _models:
            _models.clear()
            _merged.clear()
            _drop_starts()
            gc.collect()
            _empty_device_cache()
        _models[key] = load(spec, device=device)
    return _models[key]


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class RunRow:
    status: RunStatus
    step: str | None
    req: ExtractRequest
    cut: dict[int, int] | None
    corpus_sha256: str | None
    n_pass_shards: int


def _run_row(engine: Engine, run_id: int) -> RunRow | None:
    with engine.connect() as conn:
        row = conn.execute(select(ExtractionRun.status, ExtractionRun.step, ExtractionRun.request, ExtractionRun.plan,
                                  ExtractionRun.corpus_sha256).where(ExtractionRun.id == run_id)).one_or_none()
    if row is None:
        return None
    status, step, request, plan, sha = row
    return RunRow(status, step, ExtractRequest.from_json(dict(request)), sharded.cut_of(plan), sha,
                  int((plan or {}).get("shards", 0)))


def _corpus(run_id: int, run: RunRow) -> CorpusSource:
    """The run's corpus as this worker reads it, refused unless it is the file the run was planned on."""
    if run_id not in _corpora:
        req = run.req
        assert req.corpus is not None
        source = open_corpus(req.corpus, text_field=req.text_field, max_documents=req.max_documents)
        if source.sha256() != run.corpus_sha256:
            raise CorpusError(f"the corpus {req.corpus} on {lifecycle.holder_name()} is not the file run {run_id} "
                              "was planned on (sha256 differs): give every worker the same file")
        _corpora.clear()
        _corpora[run_id] = source
    return _corpora[run_id]


def _start_cache(run_id: int, run: RunRow, loaded: LoadedModel, create: bool) -> StartCache | None:
    """The starts kept for ``run_id`` in this process: created for a pass shard (``create``), read by an
    ablation shard (none when this process ran none of the run's pass shards, or was restarted)."""
    if run_id not in _starts:
        if not create:
            return None
        _drop_starts()
        _starts[run_id] = sharded.start_cache(loaded, run.req)
    return _starts[run_id]


def _drop_starts(run_id: int | None = None) -> None:
    for key in [k for k in _starts if run_id is None or k == run_id]:
        kept = _starts.pop(key)
        if kept is not None:
            kept.clear()


def _merged_state(engine: Engine, run_id: int, run: RunRow, loaded: LoadedModel) -> sharded.Merged:
    """The run's merged pass state, computed once per process (it is the same wherever computed:
    the states are folded in shard order)."""
    if run_id not in _merged:
        _merged.clear()
        _merged[run_id] = sharded.merged(engine, run_id, loaded, run.req, _corpus(run_id, run), run.cut)
    return _merged[run_id]


# --- sending -------------------------------------------------------------------------------------


def plan(req: ExtractRequest, engine: Engine, fence: Fence | None, sender: Sender,
         log: Callable[[str], None] = logger.info) -> int:
    """The request's task: load the model, plan the pass shards, register the run (fenced by the
    request's attempt) and send its shards. Returns the run id."""
    p = prepare(req, engine, log=log, loader=model)
    with engine.connect() as conn:
        run_id, _ = lifecycle.register(conn, name=p.name, entry=p.entry, run=p.run,
                                       shards=p.plan.shards if p.plan else [], fence=fence, driver="queue")
    sent = dispatch(engine, sender, run_id, again_s=0)
    log(f"run {run_id}: sent {sum(len(d.shards) for d in sent)} shard(s)"
        + (f" and step {sent[0].step}" if sent and sent[0].step else ""))
    return run_id


# What else ends with a run: the request that planned it (catalog/requests.py ``settle``), passed in
# by the task layer so that runs never import requests (requests imports this module to plan).
Ended = Callable[[Engine, int], None]


def _ended(_engine: Engine, _run_id: int) -> None:
    return None


def _fail_run(engine: Engine, run_id: int, error: BaseException | str, ended: Ended) -> None:
    _drop_starts(run_id)
    lifecycle.fail(engine, run_id, False, error)
    ended(engine, run_id)


def _die_for_device(exc: BaseException) -> None:
    logger.error("fatal device error; this worker process exits for a fresh one: %s", lifecycle.one_line(exc))
    os._exit(EXIT_DEVICE_ERROR)


def run_shard(run_id: int, kind: str, index: int, *, sender: Sender, url: str | None = None,
              log: Callable[[str], None] = logger.info, ended: Ended = _ended) -> str:
    """One delivery of a shard's message; returns what it did ("held": a live attempt has it)."""
    from catalog.store.database import database_url

    url = url or database_url()
    engine = worker_engine(url)
    liveness = private_engine(url).connect()
    then = lifecycle.STEP_OF_KIND[kind]
    outcome, retry, last, fatal = "", False, False, None
    try:
        if not lifecycle.lock_shard(liveness, run_id, kind, index):
            return "held"
        shard = lifecycle.shard(engine, run_id, kind, index)
        run = _run_row(engine, run_id)
        if shard is None or run is None:
            return "missing"
        if run.status != RunStatus.running:
            return f"dropped: run {run_id} is {run.status.value}"
        if shard.status == "done":
            return "done already"
        try:
            attempt = lifecycle.claim(engine, shard, lifecycle.holder_name(), lease_s=settings.shard_lease_s,
                                      max_attempts=settings.shard_max_attempts, locked=True)
        except lifecycle.ShardFailed as exc:
            _fail_run(engine, run_id, exc, ended)
            return f"failed: {exc}"
        log(f"run {run_id}: {kind} shard {index}, attempt {attempt}")
        try:
            loaded = model(run.req.model, run.req.device)
            if kind == ShardKind.pass_.value:
                last = sharded.run_pass_shard(engine, shard, attempt, loaded, run.req, _corpus(run_id, run), run.cut,
                                              then=then, starts=_start_cache(run_id, run, loaded, create=True))
            else:
                m = _merged_state(engine, run_id, run, loaded)
                last = sharded.run_ablation_shard(engine, shard, attempt, loaded, run.req, m.triggers, m.table,
                                                  then=then, starts=_start_cache(run_id, run, loaded, create=False))
            outcome = "done"
        except lifecycle.RunStateError as exc:  # cancelled, or a newer attempt took it over
            return f"dropped: {exc}"
        except Exception as exc:  # noqa: BLE001  (any failure is the attempt's: recorded, retried, capped)
            final = lifecycle.fail_attempt(engine, shard, attempt, exc, max_attempts=settings.shard_max_attempts)
            logger.warning("run %s: %s shard %s attempt %s failed: %s", run_id, kind, index, attempt,
                           lifecycle.one_line(exc))
            if final:
                _fail_run(engine, run_id, lifecycle.ShardFailed(
                    f"{kind} shard {index} failed {attempt} time(s): {lifecycle.one_line(exc)}"), ended)
            if fatal_device_error(exc):
                fatal = exc
            elif final:
                return "failed"
            retry = not final
            outcome = "failed attempt; sent again"
    finally:
        lifecycle.release(liveness)  # before any message goes out: its delivery must find the lock free
    if fatal is not None:
        if retry:
            sender.shard(run_id, kind, index)
        _die_for_device(fatal)
    if retry:
        sender.shard(run_id, kind, index)
    if last:
        dispatch(engine, sender, run_id, again_s=0)
        outcome += f"; run {run_id} moves to {then[1].value}"
    return outcome


def run_step(run_id: int, step: str, *, sender: Sender, url: str | None = None,
             log: Callable[[str], None] = logger.info, ended: Ended = _ended, fence: Fence | None = None) -> str:
    """One delivery of a run's merge or finish message; returns what it did. ``fence``: checked in the
    publishing transaction (the request's, catalog/requests.py)."""
    from catalog.store.database import database_url

    url = url or database_url()
    engine = worker_engine(url)
    liveness = private_engine(url).connect()
    which = RunStep(step)
    why = lifecycle.begin_step(liveness, engine, run_id, which, lifecycle.holder_name(),
                               settings.shard_max_attempts)
    if why is not None:
        if why.startswith("gave up"):
            ended(engine, run_id)
        return f"nothing to do: {why}"
    fatal: BaseException | None = None
    try:
        run = _run_row(engine, run_id)
        assert run is not None
        loaded = model(run.req.model, run.req.device)
        if which is RunStep.merge:
            outcome = _merge_step(engine, run_id, run, loaded)
        else:
            _drop_starts(run_id)  # every ablation shard is done: its memory goes to the finish
            outcome = _finish_step(engine, liveness, run_id, run, loaded, log, fence)
    except lifecycle.RunStateError as exc:
        return f"stopped: {exc}"
    except Exception as exc:
        if fatal_device_error(exc):
            fatal = exc
        else:
            _fail_run(engine, run_id, exc, ended)
            raise  # a bug or a database failure: the worker's log gets the traceback
    finally:
        lifecycle.release(liveness)
    if fatal is not None:
        dispatch(engine, sender, run_id, again_s=0)
        _die_for_device(fatal)
    dispatch(engine, sender, run_id, again_s=0)
    return outcome


def _merge_step(engine: Engine, run_id: int, run: RunRow, loaded: LoadedModel) -> str:
    """Merge the pass states, plan the ablation shards (an encoder has none) and move the run on."""
    lifecycle.set_progress(engine, run_id, "merging shard states")
    m = _merged_state(engine, run_id, run, loaded)
    lifecycle.add_timings(engine, run_id, {"merge": m.seconds})
    nxt = RunStep.finish
    if loaded.view.causal:
        sharded.plan_ablation(engine, run_id, m.table, run.n_pass_shards)
        if lifecycle.shards(engine, run_id, ShardKind.ablation):
            nxt = RunStep.ablation
            lifecycle.set_progress(engine, run_id, "ablation")
    moved = lifecycle.advance(engine, run_id, RunStep.merge, nxt)
    return f"merged; run {run_id} moves to {nxt.value}" if moved else "merged; the run had moved on"


def _finish_step(engine: Engine, liveness: Any, run_id: int, run: RunRow, loaded: LoadedModel,
                 log: Callable[[str], None], fence: Fence | None) -> str:
    """Labels, baselines, projections, ingest, indexes and publish: one transaction, as in-process."""
    from catalog.store.models import CatalogModel

    timings: dict[str, float] = {}
    counts: dict[str, Any] = {}
    result = None
    if run.req.corpus is not None:
        m = _merged_state(engine, run_id, run, loaded)
        ablated: dict[str, Any] = {}
        ablation_tokens = 0
        if loaded.view.causal:
            ablated, ablation_tokens = sharded.ablations(engine, run_id, m.table)
        lifecycle.set_progress(engine, run_id, "labels")
        result = sharded.analysis(loaded, run.req, m.triggers, m.state, m.table, ablated, ablation_tokens)
        timings.update(lifecycle.shard_seconds(engine, run_id))
        timings.update(result.timings)
        counts.update(result.counts)
        counts["shards"] = run.n_pass_shards
    lifecycle.take_write_lock(liveness, engine, run_id)
    lifecycle.set_progress(engine, run_id, "weights, projections and ingest")
    with engine.connect() as conn:
        name, earlier = conn.execute(select(CatalogModel.name, ExtractionRun.timings).join(
            ExtractionRun, ExtractionRun.model_id == CatalogModel.id).where(ExtractionRun.id == run_id)).one()
    earlier = {**(earlier or {}), **timings}
    sharded.finish(engine, run_id, name, loaded, run.req, result, None, lambda _s: None, counts, earlier,
                   fence)
    _merged.pop(run_id, None)
    _corpora.pop(run_id, None)
    lifecycle.drop_superseded(engine, name)
    tidy(engine)
    log(f"run {run_id}: published catalog {name!r}")
    return "published"
