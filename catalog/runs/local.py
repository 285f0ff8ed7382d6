"""Plan a run as shards and drive every step in this process; resume a run that was interrupted.

The run row, its plan and its shards are committed first, so progress and failures are visible
and a killed run can go on. All catalog rows go in inside the one transaction that also marks the
run ``complete`` and points the catalog entry at it (``sharded.finish``): anything that goes wrong
before that commit (an exception, Ctrl-C, a killed process) leaves the previous catalog as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from catalog.config import settings
from catalog.corpus import CorpusSource, open_corpus
from catalog.extract.params import Progress
from catalog.extract.windows import choose_bos
from catalog.loading import LoadedModel, load, resolve
from catalog.runs import lifecycle, sharded
from catalog.runs.schemas import ExtractRequest, Fence, RunSummary, StageHook
from catalog.store import migrate
from catalog.store.database import check_connection, get_engine
from catalog.store.models import RunStep, ShardKind

PROJECTION_CONVENTION = "raw_unembedding"


def bos_record(loaded: LoadedModel, spec: str) -> dict[str, Any]:
    """The BOS a run reads windows after, as stored in its parameters (decoders; encoders use CLS/SEP)."""
    if not loaded.view.causal:
        return {"bos_token_id": None, "bos_token": None, "bos_reason": "encoder: [CLS] text [SEP]"}
    tid, why = choose_bos(loaded.tokenizer, spec)
    token = None if tid is None else loaded.tokenizer.convert_ids_to_tokens(tid)
    return {"bos_token_id": tid, "bos_token": token, "bos_reason": why}


def _entry(loaded: LoadedModel) -> dict[str, Any]:
    view = loaded.view
    return {"source": loaded.source.location, "family": view.family.name,
            "model_type": loaded.model.config.model_type, "n_layers": view.n_layers, "d_model": view.d_model,
            "d_mlp": view.d_mlp, "vocab_size": int(view.unembedding().shape[0]), "gated": view.gated,
            "causal": view.causal}


@dataclass
class Prepared:
    """What registering a run needs: the model loaded, the corpus read once and cut into shards."""

    name: str
    loaded: LoadedModel
    corpus: CorpusSource | None
    plan: sharded.PassPlan | None
    entry: dict[str, Any]
    run: dict[str, Any]  # the run row's columns
    timings: dict[str, float]


def prepare(
    req: ExtractRequest, engine: Engine, *, progress: Progress | None = None, stage: StageHook = lambda _s: None,
    log: Callable[[str], None] = lambda _m: None, loader: Callable[[str, str | None], LoadedModel] | None = None,
) -> Prepared:
    """Check the request, load the model and plan the pass shards: everything before the run row.

    A bad model path or corpus fails before the model loads; the schema must be at head
    (``neuron-catalog db upgrade``; ``serve`` upgrades too): extraction never migrates."""
    timings: dict[str, float] = {}
    source_model = resolve(req.model)  # a bad path fails before anything else starts
    name = req.name or source_model.name
    corpus = None
    if req.corpus is not None:
        corpus = open_corpus(req.corpus, text_field=req.text_field, max_documents=req.max_documents)
        corpus.validate()
    check_connection(engine)
    migrate.require_head(engine.url.render_as_string(hide_password=False), who="extract")

    t = time.perf_counter()
    loaded = (loader or (lambda m, d: load(m, device=d)))(req.model, req.device)
    timings["load"] = time.perf_counter() - t
    bos = bos_record(loaded, req.params.bos)  # an unknown --bos token fails here, before any row is written
    log(f"loaded {source_model.location} ({loaded.view.family.name}, {loaded.view.n_layers} layers x "
        f"{loaded.view.d_mlp} neurons) on {loaded.device} in {timings['load']:.1f}s")

    plan: sharded.PassPlan | None = None
    shard_tokens = req.shard_tokens or settings.shard_tokens
    if corpus is not None:
        stage("plan")
        t = time.perf_counter()
        plan = sharded.plan_pass(corpus, loaded, req, shard_tokens, progress)
        timings["plan"] = time.perf_counter() - t
        if plan.undecodable:
            log(f"corpus: {plan.undecodable} undecodable line(s) skipped and counted")
        log(f"plan: {plan.tokens} tokens of {plan.documents} documents in {len(plan.shards)} shard(s) "
            f"of up to {shard_tokens} tokens")
    run = {
        "parameters": {
            **req.params.__dict__, **bos, "model": req.model, "source_kind": loaded.source.kind,
            "device": str(loaded.device), "max_tokens": req.max_tokens, "max_documents": req.max_documents,
            "text_field": req.text_field if corpus is not None else None, "shard_tokens": shard_tokens,
        },
        "projection_convention": PROJECTION_CONVENTION,
        "corpus_sha256": corpus.sha256() if corpus is not None else None,
        "corpus": None if corpus is None or plan is None else {
            "source": corpus.source, "format": corpus.format, "documents": plan.documents,
            "undecodable": plan.undecodable, "provenance": corpus.provenance(),
        },
        "request": {**req.to_json(), "shard_tokens": shard_tokens},
        "plan": None if plan is None else {**plan.to_json(), "shard_tokens": shard_tokens},
        "timings": timings,
    }
    return Prepared(name, loaded, corpus, plan, _entry(loaded), run, timings)


def extract(
    req: ExtractRequest,
    *,
    engine: Engine | None = None,
    progress: Progress | None = None,
    on_stage: StageHook | None = None,
    log: Callable[[str], None] = lambda _m: None,
    fence: Fence | None = None,
) -> RunSummary:
    """Extract a catalog in this process and publish it atomically under ``req.name`` (default:
    from the model spec). ``fence``: see :class:`catalog.runs.schemas.Fence`."""
    stage = on_stage or (lambda _s: None)
    engine = engine or get_engine()
    p = prepare(req, engine, progress=progress, stage=stage, log=log)
    lifecycle.reap_stale_runs(engine)
    liveness = engine.connect()  # holds the run's liveness lock until this function returns
    try:
        run_id, created = lifecycle.register(liveness, name=p.name, entry=p.entry, run=p.run,
                                             shards=p.plan.shards if p.plan else [], fence=fence)
    except BaseException:
        liveness.close()
        raise
    return _drive(engine, liveness, run_id, created, p.name, p.loaded, req, p.corpus, progress, stage, log, fence,
                  p.timings)


def resume(
    run_id: int,
    *,
    engine: Engine | None = None,
    progress: Progress | None = None,
    on_stage: StageHook | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> RunSummary:
    """Go on with an interrupted (or failed) local run: finished shards are reused, not recomputed;
    the catalog it publishes is the one an uninterrupted run gives."""
    from catalog.store.models import CatalogModel, ExtractionRun

    stage = on_stage or (lambda _s: None)
    engine = engine or get_engine()
    check_connection(engine)
    migrate.require_head(engine.url.render_as_string(hide_password=False), who="resume")
    lifecycle.reap_stale_runs(engine)
    liveness = engine.connect()
    stored = lifecycle.take_over(liveness, run_id)  # releases the connection itself on refusal
    try:
        req = ExtractRequest.from_json(stored)
        with engine.connect() as conn:
            from sqlalchemy import select

            name, sha, earlier = conn.execute(
                select(CatalogModel.name, ExtractionRun.corpus_sha256, ExtractionRun.timings)
                .join(ExtractionRun, ExtractionRun.model_id == CatalogModel.id).where(ExtractionRun.id == run_id)).one()
        corpus = None
        if req.corpus is not None:
            corpus = open_corpus(req.corpus, text_field=req.text_field, max_documents=req.max_documents)
            if corpus.sha256() != sha:
                raise lifecycle.RunStateError(
                    f"run {run_id}: the corpus {corpus.source} changed since the run started (sha256 differs); "
                    "its shards cannot be reused: start a new extraction")
        t = time.perf_counter()
        loaded = load(req.model, device=req.device)
        timings = {**(earlier or {}), "load": (earlier or {}).get("load", 0.0) + time.perf_counter() - t}
        log(f"resuming run {run_id}: loaded {loaded.source.location} on {loaded.device}")
    except BaseException as exc:
        _stop(engine, run_id, False, exc)
        lifecycle.release(liveness)
        raise
    return _drive(engine, liveness, run_id, False, name, loaded, req, corpus, progress, stage, log, None, timings)


def _stop(engine: Engine, run_id: int, created: bool, exc: BaseException) -> None:
    """How a run ends when its driver stops early: Ctrl-C (or a lost lease, or a cancel) leaves it
    resumable or cancelled; an error fails it."""
    if isinstance(exc, KeyboardInterrupt | lifecycle.StaleLease):
        lifecycle.interrupt(engine, run_id)
    elif not isinstance(exc, lifecycle.RunCancelled):
        lifecycle.fail(engine, run_id, created, exc)


def _drive(
    engine: Engine, liveness: Any, run_id: int, created: bool, name: str, loaded: LoadedModel,
    req: ExtractRequest, corpus: CorpusSource | None, progress: Progress | None, stage: StageHook,
    log: Callable[[str], None], fence: Fence | None, timings: dict[str, float],
) -> RunSummary:
    holder = lifecycle.holder_name()
    counts: dict[str, Any] = {}
    reused = 0
    try:
        result = None
        if corpus is not None:
            from sqlalchemy import select

            from catalog.store.models import ExtractionRun

            with engine.connect() as conn:
                plan = conn.scalar(select(ExtractionRun.plan).where(ExtractionRun.id == run_id))
            cut = sharded.cut_of(plan)
            stage("corpus")
            lifecycle.set_step(engine, run_id, RunStep.pass_)
            shards = lifecycle.shards(engine, run_id, ShardKind.pass_)
            todo = sharded.pending(shards)
            reused += len(shards) - len(todo)
            if progress is not None and len(todo) < len(shards):
                progress("corpus pass", sum(s.tokens for s in shards if s not in todo), sum(s.tokens for s in shards))
            total = sum(s.tokens for s in shards)
            # the windows' starts, kept by the pass shards run here for the ablation shards run here
            starts = sharded.start_cache(loaded, req)
            for shard in todo:
                stage(f"pass shard {shard.index}")
                lifecycle.check_running(engine, run_id)
                lifecycle.set_progress(engine, run_id, f"corpus pass: shard {shard.index + 1} of {len(shards)}")
                sharded.with_attempts(engine, shard, lambda a, sh=shard: sharded.run_pass_shard(  # type: ignore[misc]
                    engine, sh, a, loaded, req, corpus, cut,
                    None if progress is None else (lambda st, n, _t: progress(st, n, total)), starts=starts),
                    holder, log)
            stage("merge")
            lifecycle.set_progress(engine, run_id, "merging shard states")
            m = sharded.merged(engine, run_id, loaded, req, corpus, cut, progress)
            state, triggers, table = m.state, m.triggers, m.table
            timings["merge"] = m.seconds
            ablated: dict[str, Any] = {}
            ablation_tokens = 0
            if loaded.view.causal:  # an encoder has no prefix ablations
                lifecycle.set_step(engine, run_id, RunStep.ablation)
                sharded.plan_ablation(engine, run_id, table, len(shards))
                ab_shards = lifecycle.shards(engine, run_id, ShardKind.ablation)
                ab_todo = sharded.pending(ab_shards)
                reused += len(ab_shards) - len(ab_todo)
                ab_total = sum(s.tokens for s in ab_shards)
                for shard in ab_todo:
                    stage(f"ablation shard {shard.index}")
                    lifecycle.check_running(engine, run_id)
                    lifecycle.set_progress(engine, run_id, f"ablation: shard {shard.index + 1} of {len(ab_shards)}")
                    sharded.with_attempts(engine, shard, lambda a, sh=shard: sharded.run_ablation_shard(  # type: ignore[misc]
                        engine, sh, a, loaded, req, triggers, table, starts=starts), holder, log)
                    if progress is not None:
                        progress("ablation", shard.tokens, ab_total)
                ablated, ablation_tokens = sharded.ablations(engine, run_id, table)
            if starts is not None:
                counts["start_cache_windows"], counts["start_cache_mb"] = len(starts), round(starts.used / 2**20)
                starts.clear()
            lifecycle.set_step(engine, run_id, RunStep.finish)
            lifecycle.set_progress(engine, run_id, "labels")
            result = sharded.analysis(loaded, req, triggers, state, table, ablated, ablation_tokens, progress)
            timings.update(lifecycle.shard_seconds(engine, run_id))
            timings.update(result.timings)
            counts.update(result.counts)
            counts["shards"] = len(shards)
        else:
            lifecycle.set_step(engine, run_id, RunStep.finish)
        stage("weights")
        lifecycle.take_write_lock(liveness, engine, run_id)
        lifecycle.set_progress(engine, run_id, "weights, projections and ingest")
        timings.update(sharded.finish(engine, run_id, name, loaded, req, result, progress, stage, counts, timings,
                                      fence))
    except BaseException as exc:  # KeyboardInterrupt included: the run stops resumable, then re-raised
        try:
            _stop(engine, run_id, created, exc)
        finally:
            lifecycle.release(liveness)
        raise
    try:
        lifecycle.drop_superseded(engine, name)  # published: a failure here leaves the run complete
        tidy(engine)
    finally:
        lifecycle.release(liveness)
    view = loaded.view
    return RunSummary(run_id, name, view.n_layers, view.d_mlp, timings, counts, reused)


def tidy(engine: Engine) -> None:
    """After a publish: refresh the planner's statistics."""
    from sqlalchemy import text

    # Fresh statistics for the planner: a pattern search picks its plan (prefix index or neurons in
    # order) by how common the words are in the new rows. VACUUM marks the new triggers' pages
    # all-visible, so the prefix-first plan is an index-only scan at once (pages of older runs are
    # skipped through the visibility map).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) triggers"))
        conn.execute(text("ANALYZE neurons, neuron_search, prefixes, value_tokens, tokens"))
