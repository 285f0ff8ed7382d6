"""Extraction runs end to end: model (+ corpus) -> pipeline -> COPY -> one publishing commit.

The run row is committed first (status ``running``) so that progress and failures are visible; all
catalog rows go in inside one transaction that also marks the run ``complete`` and points the
catalog entry at it. Anything that goes wrong before that commit (an exception, Ctrl-C, a killed
process) leaves the previous catalog exactly as it was.

While a run is alive its process holds a session-level advisory lock keyed by the run id, taken in
the very transaction that creates the run row. A ``running`` run whose lock is free therefore
belongs to a process that died (SIGKILL, power loss): ``reap_stale_runs`` marks it failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.corpus import Corpus, CorpusError, load_corpus
from catalog.extract.columns import layer_columns, prefix_columns
from catalog.extract.corpus_pass import choose_bos, tokenise
from catalog.extract.pipeline import CorpusAnalysis, Parameters, Progress, analyse_corpus, layer_records
from catalog.loading import LoadedModel, load, resolve, tokenizer_sha256, weights_sha256
from catalog.read.catalog import catalog_names, current_run  # noqa: F401  (re-exported for callers)
from catalog.store import migrate
from catalog.store.database import check_connection, get_engine, session_scope
from catalog.store.ingest import RunWriter
from catalog.store.models import CatalogModel, ExtractionRun, RunStatus
from catalog.store.runs import INTERRUPTED, RUN_LOCK_CLASS, reap_stale_runs  # noqa: F401  (one home, torch-free; re-exported)
from catalog.store.search_index import drop_orphan_vector_indexes

PROJECTION_CONVENTION = "raw_unembedding"
# Key (with 0) of the session-level advisory lock that one extraction at a time holds while it writes,
# publishes and cleans up. Concurrent extractions (several workers) would otherwise deadlock: each
# transaction holds ROW EXCLUSIVE on neurons from its COPY and then wants SHARE for its HNSW
# CREATE INDEX; DROP INDEX CONCURRENTLY and ANALYZE of the cleanup conflict likewise. The model
# load and the corpus pass, the long parts, still run side by side.
WRITE_LOCK_CLASS = 0x4E57  # "NW"
WAITING_TO_WRITE = "waiting for another extraction to finish writing"


def bos_record(loaded: LoadedModel, spec: str) -> dict[str, Any]:
    """The BOS a run reads windows after, as stored in its parameters (decoders; encoders use CLS/SEP)."""
    if not loaded.view.causal:
        return {"bos_token_id": None, "bos_token": None, "bos_reason": "encoder: [CLS] text [SEP]"}
    tid, why = choose_bos(loaded.tokenizer, spec)
    token = None if tid is None else loaded.tokenizer.convert_ids_to_tokens(tid)
    return {"bos_token_id": tid, "bos_token": token, "bos_reason": why}


def default_parameters(**overrides: Any) -> Parameters:
    """Extraction parameters: the dataclass defaults, the label thresholds from settings, then ``overrides``.

    Every entry point (CLI, Celery task, Python callers) goes through here, so ``CATALOG_*``
    settings apply wherever an extraction starts.
    """
    base = replace(Parameters(), label_min_prefix=settings.label_min_prefix,
                   label_min_triggers=settings.label_min_triggers, label_quantile=settings.label_quantile)
    return replace(base, **overrides)


@dataclass
class ExtractRequest:
    model: str
    name: str | None = None
    corpus: str | None = None
    text_field: str = "text"
    max_tokens: int | None = None
    max_documents: int | None = None
    device: str | None = None
    params: Parameters = field(default_factory=default_parameters)


@dataclass
class RunSummary:
    run_id: int
    name: str
    n_layers: int
    d_mlp: int
    timings: dict[str, float]
    counts: dict[str, Any]


# Test hook: called with a stage name as each stage starts (lets tests interrupt a run mid-way).
StageHook = Callable[[str], None]


class Fence(Protocol):
    """Ties a run to a claim held outside this module (a distributed request, catalog/requests.py).

    Each hook runs inside the transaction it is named after and may raise to abort it: ``registered``
    in the one that creates the run row (before its liveness lock is taken), ``publishing`` in the
    one that publishes the run, after the catalog rows and the run's new state are in place and
    before the commit, so the claim's check and its own change commit (or roll back) with the catalog.
    """

    def registered(self, session: Session, run_id: int) -> None: ...

    def publishing(self, session: Session, run_id: int) -> None: ...


def _set_progress(engine: Engine, run_id: int, stage: str) -> None:
    with session_scope(engine) as s:
        s.execute(update(ExtractionRun).where(ExtractionRun.id == run_id).values(progress={"stage": stage}))


def _register(
    conn: Connection, name: str, loaded: LoadedModel, req: ExtractRequest, corpus: Corpus | None, fence: Fence | None,
) -> tuple[int, bool]:
    """Create the run row (and the catalog entry if new) and take the run's liveness lock on ``conn``.

    Returns (run id, whether the entry is new). The lock is taken before the row commits, so no
    other process ever sees this run as ``running`` without its lock.
    """
    view = loaded.view
    with Session(bind=conn) as s, s.begin():
        entry = s.scalar(select(CatalogModel).where(CatalogModel.name == name))
        created = entry is None
        if entry is None:
            entry = CatalogModel(
                name=name, source=loaded.source.location, family=view.family.name,
                model_type=loaded.model.config.model_type, n_layers=view.n_layers, d_model=view.d_model,
                d_mlp=view.d_mlp, vocab_size=int(view.unembedding().shape[0]), gated=view.gated,
                causal=view.causal,
            )
            s.add(entry)
            s.flush()
        run = ExtractionRun(
            model_id=entry.id,
            status=RunStatus.running,
            parameters={
                **asdict(req.params), **bos_record(loaded, req.params.bos),
                "model": req.model, "source_kind": loaded.source.kind,
                "device": str(loaded.device), "max_tokens": req.max_tokens, "max_documents": req.max_documents,
                "text_field": req.text_field if corpus is not None else None,
            },
            projection_convention=PROJECTION_CONVENTION,
            corpus_sha256=corpus.sha256 if corpus is not None else None,
            corpus=None if corpus is None else {
                "source": corpus.source, "format": corpus.format, "documents": len(corpus.documents),
                "undecodable": corpus.undecodable, "provenance": corpus.provenance,
            },
            progress={"stage": "starting"},
        )
        s.add(run)
        s.flush()
        if fence is not None:  # before the lock: a refusal rolls back with nothing left held
            fence.registered(s, run.id)
        s.execute(text("SELECT pg_advisory_lock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run.id})
        return run.id, created


def _take_write_lock(conn: Connection, engine: Engine, run_id: int) -> None:
    """Take the write lock on the run's liveness connection (see ``WRITE_LOCK_CLASS``), saying so
    in the run's progress while another extraction holds it."""
    if not conn.scalar(text("SELECT pg_try_advisory_lock(:c, 0)"), {"c": WRITE_LOCK_CLASS}):
        conn.commit()
        _set_progress(engine, run_id, WAITING_TO_WRITE)
        conn.execute(text("SELECT pg_advisory_lock(:c, 0)"), {"c": WRITE_LOCK_CLASS})
    conn.commit()  # the liveness connection must not sit idle in a transaction


def _release(conn: Connection, run_id: int) -> None:
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


def _fail(engine: Engine, run_id: int, created_entry: bool, error: BaseException) -> None:
    message = f"{type(error).__name__}: {error}".strip()
    with session_scope(engine) as s:
        run = s.get(ExtractionRun, run_id)
        if run is None:
            return
        run.status = RunStatus.failed
        run.error = message[:2000]
        run.finished_at = datetime.now(UTC)
        if created_entry:
            entry = s.get(CatalogModel, run.model_id)
            if entry is not None and entry.current_run_id is None:
                s.delete(entry)  # an entry that never had a catalog goes with its failed run


def extract(
    req: ExtractRequest,
    *,
    engine: Engine | None = None,
    progress: Progress | None = None,
    on_stage: StageHook | None = None,
    log: Callable[[str], None] = lambda _m: None,
    migrate_schema: bool = True,
    fence: Fence | None = None,
) -> RunSummary:
    """Extract a catalog and publish it atomically under ``req.name`` (default: from the model spec).

    ``migrate_schema``: upgrade the schema first (the in-process CLI path); workers pass False and
    check the revision themselves (catalog/requests.py). ``fence``: see :class:`Fence`.
    """
    stage = on_stage or (lambda _s: None)
    timings: dict[str, float] = {}
    source = resolve(req.model)  # a bad path fails before anything else starts
    name = req.name or source.name
    corpus = None
    if req.corpus is not None:
        corpus = load_corpus(req.corpus, text_field=req.text_field, max_documents=req.max_documents)
        if corpus.undecodable:
            log(f"corpus: {corpus.undecodable} undecodable line(s) skipped and counted")
    engine = engine or get_engine()
    check_connection(engine)
    if migrate_schema:
        migrate.upgrade(str(engine.url.render_as_string(hide_password=False)))

    t = time.perf_counter()
    loaded = load(req.model, device=req.device)
    timings["load"] = time.perf_counter() - t

    bos_record(loaded, req.params.bos)  # an unknown --bos token fails here, before any row is written
    log(f"loaded {source.location} ({loaded.view.family.name}, {loaded.view.n_layers} layers x "
        f"{loaded.view.d_mlp} neurons) on {loaded.device} in {timings['load']:.1f}s")
    reap_stale_runs(engine)
    liveness = engine.connect()  # holds the run's liveness lock until this function returns
    try:
        run_id, created = _register(liveness, name, loaded, req, corpus, fence)
    except BaseException:
        liveness.close()
        raise
    try:
        counts: dict[str, Any] = {}
        analysis: CorpusAnalysis | None = None
        if corpus is not None:
            stage("corpus")
            _set_progress(engine, run_id, "corpus pass")
            tokenised = tokenise(corpus.documents, loaded.tokenizer, window=req.params.window, max_tokens=req.max_tokens,
                                 causal=loaded.view.causal, bos=req.params.bos)
            if tokenised.n_tokens == 0:
                raise CorpusError(f"corpus {corpus.source} has no tokens after tokenisation")
            analysis = analyse_corpus(loaded.view, loaded.tokenizer, tokenised, req.params, progress)
            timings.update(analysis.timings)
            counts.update(analysis.counts)
        stage("weights")
        _take_write_lock(liveness, engine, run_id)
        _set_progress(engine, run_id, "weights, projections and ingest")
        timings.update(_write_and_publish(engine, run_id, name, loaded, req, analysis, progress, stage, counts, timings,
                                          fence))
    except BaseException as exc:  # KeyboardInterrupt included: the run is marked failed, then re-raised
        try:
            _fail(engine, run_id, created, exc)
        finally:
            _release(liveness, run_id)
        raise
    try:
        _drop_superseded(engine, name)  # published: a failure here leaves the run complete
    finally:
        _release(liveness, run_id)
    return RunSummary(run_id, name, loaded.view.n_layers, loaded.view.d_mlp, timings, counts)


def _write_and_publish(
    engine: Engine, run_id: int, name: str, loaded: LoadedModel, req: ExtractRequest,
    analysis: CorpusAnalysis | None, progress: Progress | None, stage: StageHook, counts: dict[str, Any],
    earlier: dict[str, float], fence: Fence | None = None,
) -> dict[str, float]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    weights_hash, tok_hash = weights_sha256(loaded.model), tokenizer_sha256(loaded.tokenizer)
    timings["hashes"] = time.perf_counter() - t0
    vocab = int(loaded.view.unembedding().shape[0])
    texts = loaded.tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
    by_stage: dict[str, float] = {}
    with engine.connect() as conn, conn.begin():
        dbapi = conn.connection.driver_connection
        writer = RunWriter(dbapi, run_id)
        writer.tokens(texts, loaded.view.unembedding().detach().float().cpu().numpy())
        if analysis is not None:
            writer.prefixes(prefix_columns(analysis))
        records = layer_records(loaded.view, req.params, analysis, progress)
        for rec in records:
            stage(f"layer {rec.layer}")
            for k, v in rec.seconds.items():
                by_stage[k] = by_stage.get(k, 0.0) + v
            writer.layer(**layer_columns(rec))
        timings.update(by_stage)
        stage("vector indexes")
        timings.update(writer.vector_indexes(loaded.view.d_model))
        timings["ingest"] = writer.seconds
        timings["search_terms"] = writer.search_seconds
        counts["rows"] = dict(writer.rows)
        counts["copy_bytes"] = writer.bytes
        stage("publish")
        # Serialise publishers of one catalog entry (two extractions of the same name).
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
        with Session(bind=conn, join_transaction_mode="create_savepoint") as s:
            run = s.get(ExtractionRun, run_id)
            assert run is not None
            entry = s.get(CatalogModel, run.model_id)
            assert entry is not None
            view = loaded.view
            entry.source, entry.family = loaded.source.location, view.family.name
            entry.model_type, entry.n_layers, entry.d_model = loaded.model.config.model_type, view.n_layers, view.d_model
            entry.d_mlp, entry.vocab_size, entry.gated = view.d_mlp, vocab, view.gated
            entry.causal = view.causal
            s.execute(
                update(ExtractionRun)
                .where(ExtractionRun.model_id == entry.id, ExtractionRun.status == RunStatus.complete)
                .values(status=RunStatus.superseded)
            )
            run.status = RunStatus.complete
            run.weights_sha256, run.tokenizer_sha256 = weights_hash, tok_hash
            gain = view.final_norm_gain()
            run.final_norm_gain = None if gain is None else gain.float().cpu().numpy()
            run.label_rule = analysis.label_rule if analysis is not None else None
            # the stored timings cover the whole run (load, corpus pass, ablation), not just this stage
            run_timings = {**earlier, **timings}
            run.timings = {**run_timings, "total": sum(run_timings.values())}
            run.progress = {"stage": "complete", **{k: v for k, v in counts.items() if k != "rows"}, "rows": counts["rows"]}
            run.finished_at = datetime.now(UTC)
            entry.current_run_id = run_id
            if fence is not None:
                s.flush()
                fence.publishing(s, run_id)
            s.commit()  # releases the savepoint; the outer transaction commits below
    return timings


def _drop_superseded(engine: Engine, name: str) -> None:
    """Delete the runs this one replaced, with their rows (cascade): invisible already.

    Failed runs stay, with their error; they never had rows.
    """
    with session_scope(engine) as s:
        entry = s.scalar(select(CatalogModel).where(CatalogModel.name == name))
        if entry is None:
            return
        s.execute(
            delete(ExtractionRun).where(
                ExtractionRun.model_id == entry.id,
                ExtractionRun.status == RunStatus.superseded,
            )
        )
    drop_orphan_vector_indexes(engine)
    # Fresh statistics for the planner: a pattern search picks its plan (prefix index or neurons in
    # order) by how common the words are in the new rows. VACUUM marks the new triggers' pages
    # all-visible, so the prefix-first plan is an index-only scan at once (pages of older runs are
    # skipped through the visibility map).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) triggers"))
        conn.execute(text("ANALYZE neurons, neuron_search, prefixes, value_tokens, tokens"))


def run_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ExtractionRun)) or 0)
