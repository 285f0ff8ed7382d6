"""The steps of a run made of shards, each taking ids and re-reading what it needs from Postgres.

1. ``plan_pass``: documents in corpus order, cut by a token budget into pass shards (whole
   documents; deterministic, and independent of how many processes will run them). The plan also
   records the one document that --max-tokens cut and how many of its tokens count.
2. ``run_pass_shard``: one shard reads its document range from the corpus file, runs the corpus pass
   and writes its state (per layer: top-N, moments, firing counts) with the commit that marks it done.
3. ``merge``: folds the done shards' states in shard order (catalog/extract/states.py), layer by layer.
4. ``plan_ablation`` / ``run_ablation_shard``: the merged triggers' prefixes, cut by document ranges;
   each ablation shard ablates its prefixes and stores only the coefficients it computed.
5. ``finish``: labels with pooled thresholds, baselines, projections, ingest, indexes and publish, in
   the one transaction that makes the catalog visible (so a kill there rolls back, and a resume
   redoes this step alone).

Nothing here decides who runs a step or when: catalog/runs/local.py drives them in this process,
catalog/runs/queued.py hands the same steps to Celery workers as tasks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Self

import numpy as np
import torch
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.corpus import CorpusError, CorpusSource, Document, LineStats, check_read
from catalog.extract import ablation as abl
from catalog.extract import neighbours
from catalog.extract.columns import layer_columns, prefix_columns
from catalog.extract.params import Parameters, Progress
from catalog.extract.pipeline import (
    CorpusAnalysis,
    LayerRecord,
    ablate,
    ablation_cuts,
    analysis_from,
    layer_records,
    pass_state,
    trigger_documents,
)
from catalog.extract.pipeline import start_cache as pipeline_start_cache
from catalog.extract.states import PassState, layer_payload, pack, pass_state_from, shard_payload, unpack
from catalog.extract.windows import TokenisedCorpus, tokenise
from catalog.loading import LoadedModel, tokenizer_sha256, weights_sha256
from catalog.runs import lifecycle
from catalog.runs.lifecycle import Shard, ShardPlan
from catalog.runs.schemas import ExtractRequest, StageHook
from catalog.store.ingest import RunWriter
from catalog.store.models import RunStep, ShardKind

logger = logging.getLogger(__name__)
PLAN_BLOCK = 1024  # documents tokenised per call while planning


@dataclass(frozen=True)
class PassPlan:
    shards: list[ShardPlan]
    tokens: int
    documents: int
    undecodable: int
    cut: tuple[int, int] | None  # (document, tokens kept) of the document --max-tokens cut

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": self.documents, "undecodable": self.undecodable,
                "cut": list(self.cut) if self.cut else None, "shards": len(self.shards)}


def cut_of(plan: dict[str, Any] | None) -> dict[int, int] | None:
    """The stored plan's --max-tokens cut as ``tokenise``'s ``cut_at``."""
    cut = (plan or {}).get("cut")
    return None if not cut else {int(cut[0]): int(cut[1])}


def _tokenise(docs: list[Document], loaded: LoadedModel, params: Parameters, **kw: Any) -> TokenisedCorpus:
    return tokenise(docs, loaded.tokenizer, window=params.window, causal=loaded.view.causal, bos=params.bos, **kw)


def plan_pass(source: CorpusSource, loaded: LoadedModel, req: ExtractRequest, shard_tokens: int,
              progress: Progress | None = None) -> PassPlan:
    """Read the corpus once, as a stream, and cut it into pass shards of about ``shard_tokens``
    tokens of whole documents (a longer document is a shard of its own)."""
    stats = LineStats()
    budget = req.max_tokens
    shards: list[ShardPlan] = []
    start, stop, in_shard, offset = -1, -1, 0, -1
    total, n_docs = 0, 0
    cut: tuple[int, int] | None = None
    block: list[Document] = []

    def flush(docs: list[Document]) -> bool:
        nonlocal start, stop, in_shard, offset, total, n_docs, cut, budget
        corpus = _tokenise(docs, loaded, req.params, max_tokens=budget)
        offsets = {d.index: d.offset for d in docs}
        for slot, doc_index in enumerate(corpus.documents):
            n = len(corpus.tokens[slot])
            if in_shard and in_shard + n > shard_tokens:
                shards.append(ShardPlan(start, doc_index, in_shard, _offset(offset)))
                in_shard = 0
            if not in_shard:
                start, offset = doc_index, offsets[doc_index]
            in_shard += n
            stop = doc_index + 1
            if slot in corpus.cut_next:
                cut = (doc_index, n)
        total += corpus.n_tokens
        n_docs += len(corpus.documents)
        if progress is not None:
            progress("plan", len(docs), 0)
        if budget is not None:
            budget -= corpus.n_tokens
            return budget > 0
        return True

    for doc in source.documents(stats=stats):
        block.append(doc)
        if len(block) >= PLAN_BLOCK:
            go_on = flush(block)
            block = []
            if not go_on:
                break
    if block:
        flush(block)
    check_read(source, stats, n_docs or stats.decoded)
    if in_shard:
        shards.append(ShardPlan(start, stop, in_shard, _offset(offset)))
    if total == 0:
        raise CorpusError(f"corpus {source.source} has no tokens after tokenisation")
    return PassPlan(shards, total, n_docs, stats.undecodable, cut)


def _offset(offset: int) -> int | None:
    return offset if offset >= 0 else None


class Lease:
    """Renews an attempt's lease from a thread (every third of the lease) while its shard runs, and
    records the shard's progress on its row."""

    def __init__(self, engine: Engine, shard: Shard, attempt: int, lease_s: float) -> None:
        self.engine, self.shard, self.attempt, self.lease_s = engine, shard, attempt, lease_s
        self.done = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{shard.kind}-{shard.index}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not lifecycle.renew(self.engine, self.shard, self.attempt, lease_s=self.lease_s,
                                       done_tokens=self.done):
                    self.lost = True
                    return
            except Exception as exc:  # noqa: BLE001  (a lost database shows at the shard's own commit)
                logger.warning("%s shard %s: lease not renewed: %s", self.shard.kind, self.shard.index, exc)


def start_cache(loaded: LoadedModel, req: ExtractRequest) -> abl.StartCache | None:
    """The window starts this process's pass shards of ``req`` keep for its ablation shards, within
    CATALOG_ABLATION_START_CACHE_MB (None: nothing to keep)."""
    return pipeline_start_cache(loaded.view, req.params, settings.ablation_start_cache_mb << 20)


def run_pass_shard(engine: Engine, shard: Shard, attempt: int, loaded: LoadedModel, req: ExtractRequest,
                   source: CorpusSource, cut: dict[int, int] | None, progress: Progress | None = None,
                   then: tuple[RunStep, RunStep] | None = None, starts: abl.StartCache | None = None) -> bool:
    """One attempt at a pass shard: read its documents, run the pass, write its state (fenced).
    ``then``: see ``lifecycle.complete`` (True: this was the last pass shard of a queue-driven run).
    ``starts`` keeps the shard's windows' starts for ablation shards run later in this process."""
    t0 = time.perf_counter()
    with Lease(engine, shard, attempt, settings.shard_lease_s) as lease:
        docs = list(source.documents(shard.doc_start, shard.doc_stop, offset=shard.byte_offset))
        corpus = _tokenise(docs, loaded, req.params, cut_at=cut)

        def tick(stage: str, n: int, total: int) -> None:
            lease.done += n
            if progress is not None:
                progress(stage, n, total)

        state = pass_state(loaded.view, loaded.tokenizer, corpus, req.params, tick, starts)
        payloads = {layer: layer_payload(state, layer) for layer in range(state.n_layers)}
        payloads[-1] = shard_payload(state)
    return lifecycle.complete(engine, shard, attempt, payloads, time.perf_counter() - t0, then)


def merge(engine: Engine, run_id: int, n_layers: int, progress: Progress | None = None) -> PassState:
    """Fold the done pass shards' states in shard order, one layer at a time (the memory held is the
    merged state plus one shard's layer, whatever the corpus size)."""
    merged: PassState | None = None
    heads = [p for _, p in lifecycle.states(engine, run_id, ShardKind.pass_, -1)]
    if not heads:
        raise lifecycle.RunStateError(f"run {run_id} has no finished pass shard to merge")
    layers: list[PassState] = []
    for layer in range(n_layers):
        folded: PassState | None = None
        for _, payload in lifecycle.states(engine, run_id, ShardKind.pass_, layer):
            one = pass_state_from(None, [payload])
            folded = one if folded is None else folded.merge(one)
        assert folded is not None
        layers.append(folded)
        if progress is not None:
            progress("merge", 1, n_layers)
    counts = [pass_state_from(h, []) for h in heads]
    token_counts = sum((c.token_counts for c in counts[1:]), counts[0].token_counts)
    totals: dict[str, int] = {}
    for c in counts:
        for k, v in c.counts.items():
            totals[k] = totals.get(k, 0) + v
    merged = PassState(
        [s.stats[0] for s in layers], [s.firing[0] for s in layers], [s.top[0] for s in layers],
        None if layers[0].bottom is None else [s.bottom[0] for s in layers if s.bottom is not None],
        token_counts, totals,
    )
    return merged


def trigger_corpus(source: CorpusSource, loaded: LoadedModel, req: ExtractRequest, state: PassState,
                   cut: dict[int, int] | None) -> TokenisedCorpus:
    """The documents holding a trigger, tokenised and windowed exactly as their pass shard read them."""
    wanted = trigger_documents(state)
    if not wanted:
        return _tokenise([], loaded, req.params)
    keep = set(wanted)
    docs = [d for d in source.documents(wanted[0], wanted[-1] + 1) if d.index in keep]
    return _tokenise(docs, loaded, req.params, cut_at=cut)


@dataclass
class Merged:
    """The pass shards merged, with what the ablation and the finish step read from it."""

    state: PassState
    triggers: TokenisedCorpus  # the documents holding a trigger, windowed as their pass shard read them
    table: abl.PrefixTable
    seconds: float


def merged(engine: Engine, run_id: int, loaded: LoadedModel, req: ExtractRequest, source: CorpusSource,
           cut: dict[int, int] | None, progress: Progress | None = None) -> Merged:
    t = time.perf_counter()
    state = merge(engine, run_id, loaded.view.n_layers, progress)
    triggers = trigger_corpus(source, loaded, req, state, cut)
    table = abl.prefix_table(triggers, state.top, state.bottom)
    return Merged(state, triggers, table, time.perf_counter() - t)


def plan_ablation(engine: Engine, run_id: int, table: abl.PrefixTable, n_pass_shards: int) -> None:
    """About as many ablation shards as pass shards (the same parallelism; cut at whole documents,
    so one or two more), each a document range; planned once."""
    per_shard = max(1, -(-len(table) // max(1, n_pass_shards)))
    lifecycle.plan_ablation(engine, run_id, [ShardPlan(a, b, n) for a, b, n in ablation_cuts(table, per_shard)])


def run_ablation_shard(engine: Engine, shard: Shard, attempt: int, loaded: LoadedModel, req: ExtractRequest,
                       corpus: TokenisedCorpus, table: abl.PrefixTable, progress: Progress | None = None,
                       then: tuple[RunStep, RunStep] | None = None, starts: abl.StartCache | None = None) -> bool:
    """One attempt at an ablation shard: ablate the prefixes of its documents; store, per layer and
    kind, only the coefficients it computed (flat indices into [d_mlp, N] and values)."""
    t0 = time.perf_counter()
    with Lease(engine, shard, attempt, settings.shard_lease_s) as lease:
        def tick(stage: str, n: int, total: int) -> None:
            lease.done += n
            if progress is not None:
                progress(stage, n, total)

        out, tokens = ablate(loaded.view, loaded.tokenizer, corpus, table, req.params,
                             documents=(shard.doc_start, shard.doc_stop), progress=tick, starts=starts)
        payloads: dict[int, bytes] = {-1: pack({"tokens": np.array(tokens, dtype=np.int64)})}
        for layer in range(len(table.top_ids)):
            arrays: dict[str, np.ndarray] = {}
            for kind, per_layer in out.items():
                flat = per_layer[layer].reshape(-1)
                idx = torch.nonzero(~flat.isnan()).squeeze(1)
                arrays[f"{kind}_index"] = idx.numpy().astype(np.int32)
                arrays[f"{kind}_value"] = flat[idx].float().numpy()
            payloads[layer] = pack(arrays)
    return lifecycle.complete(engine, shard, attempt, payloads, time.perf_counter() - t0, then)


def ablations(engine: Engine, run_id: int, table: abl.PrefixTable) -> tuple[dict[str, list[torch.Tensor]], int]:
    """The done ablation shards' coefficients, put back in place: per kind, per layer [d_mlp, N]."""
    out: dict[str, list[torch.Tensor]] = {}
    for kind in ("first", "random"):
        out[kind] = [torch.full(ids.shape, float("nan")) for ids in table.top_ids]
    for layer, ids in enumerate(table.top_ids):
        for _, payload in lifecycle.states(engine, run_id, ShardKind.ablation, layer):
            a = unpack(payload)
            for kind in ("first", "random"):
                flat = out[kind][layer].view(-1)
                flat[torch.from_numpy(a[f"{kind}_index"].astype(np.int64))] = torch.from_numpy(a[f"{kind}_value"])
        del ids
    tokens = sum(int(unpack(p)["tokens"]) for _, p in lifecycle.states(engine, run_id, ShardKind.ablation, -1))
    return out, tokens


def analysis(loaded: LoadedModel, req: ExtractRequest, corpus: TokenisedCorpus, state: PassState,
             table: abl.PrefixTable, ablated: dict[str, list[torch.Tensor]], ablation_tokens: int,
             progress: Progress | None = None) -> CorpusAnalysis:
    return analysis_from(loaded.view, loaded.tokenizer, corpus, state, table, ablated, req.params,
                         {"ablation_tokens": ablation_tokens}, progress)


@contextmanager
def one_behind() -> Iterator[Callable[[Callable[[], None]], None]]:
    """``submit(call)`` runs ``call`` on one worker thread while the caller goes on. Each submit first
    waits for the previous call and raises its error; leaving, normally or by an error, waits for the
    last one, so nothing outlives the block (a transaction around it rolls back only after the
    writes it holds have stopped)."""
    pending: list[Future[None]] = []

    def submit(call: Callable[[], None]) -> None:
        if pending:
            pending.pop().result()
        pending.append(pool.submit(call))

    with ThreadPoolExecutor(1, thread_name_prefix="writer") as pool:
        try:
            yield submit
        except BaseException:
            wait(pending)
            raise
        if pending:
            pending.pop().result()


def finish(
    engine: Engine, run_id: int, name: str, loaded: LoadedModel, req: ExtractRequest,
    result: CorpusAnalysis | None, progress: Progress | None, stage: StageHook, counts: dict[str, Any],
    earlier: dict[str, float], fence: Any = None,
) -> dict[str, float]:
    """Weights, projections, corpus figures, ingest, neighbour lists and publish in one transaction."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    weights_hash, tok_hash = weights_sha256(loaded.model), tokenizer_sha256(loaded.tokenizer)
    timings["hashes"] = time.perf_counter() - t0
    view = loaded.view
    vocab = int(view.unembedding().shape[0])
    texts = loaded.tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
    by_stage: dict[str, float] = {}
    with engine.connect() as conn, conn.begin():
        # The foreign-key checks of every COPYed row run a cached query on `neurons`; with the default
        # plan_cache_mode it can be re-planned per row, and planning weighs every partial HNSW index of
        # every run on `neurons` (92 in one test database: 40 s a layer for value_tokens). One generic
        # plan (the primary key) serves them all; only this transaction's cached plans are affected.
        conn.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        dbapi = conn.connection.driver_connection
        writer = RunWriter(dbapi, run_id)
        writer.tokens(texts, view.unembedding().detach().float().cpu().numpy())
        if result is not None:
            writer.prefixes(prefix_columns(result))
        vectors: dict[str, list[torch.Tensor]] = {space: [] for space in neighbours.SPACES}
        token_lists = neighbours.TokenLists(view.unembedding(), view.final_norm_gain(), view.d_mlp,
                                            keep=settings.neighbour_list_size)
        def write(rec: LayerRecord) -> None:
            writer.layer(**layer_columns(rec))

        # Postgres writes layer L (a server process: one core) while this process computes layer L + 1,
        # and the last layer and the lists while the lists after them are computed
        with one_behind() as submit:
            for rec in layer_records(view, req.params, result, None, token_lists):
                stage(f"layer {rec.layer}")
                for k, v in rec.seconds.items():
                    by_stage[k] = by_stage.get(k, 0.0) + v
                submit(partial(write, rec))
                vectors["key"].append(rec.keys)
                vectors["value"].append(rec.values)
                if progress is not None:
                    progress("weights, projections and ingest", 1, view.n_layers)
            timings.update(by_stage)
            stage("neighbour lists")
            t1 = time.perf_counter()
            ranked = token_lists.finish()
            timings["token_lists"] = timings.get("token_lists", 0.0) + time.perf_counter() - t1
            del token_lists
            for (convention, ranking), lists in ranked.items():
                submit(partial(writer.token_lists, convention, ranking, lists.ids, lists.scores, lists.length))
            del ranked
            for space, parts in vectors.items():
                t1 = time.perf_counter()
                lists = neighbours.similar_lists(
                    torch.cat(parts).to(view.unembedding().device), keep=settings.neighbour_list_size)
                timings[f"similar_{space}"] = time.perf_counter() - t1
                submit(partial(writer.similar_lists, space, view.d_mlp, lists.ids, lists.scores, lists.length))
                if progress is not None:
                    progress("similar-neuron lists", 1, len(vectors))
            del vectors
        timings["ingest"] = writer.seconds
        timings["search_terms"] = writer.search_seconds
        counts["rows"] = dict(writer.rows)
        counts["copy_bytes"] = writer.bytes
        stage("publish")
        # Serialise publishers of one catalog entry (two extractions of the same name).
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
        gain = view.final_norm_gain()
        run_timings = {**earlier, **timings}
        with Session(bind=conn, join_transaction_mode="create_savepoint") as s:
            lifecycle.publish(
                s, run_id,
                entry={"source": loaded.source.location, "family": view.family.name,
                       "model_type": loaded.model.config.model_type, "n_layers": view.n_layers,
                       "d_model": view.d_model, "d_mlp": view.d_mlp, "vocab_size": vocab, "gated": view.gated,
                       "causal": view.causal},
                run={"weights_sha256": weights_hash, "tokenizer_sha256": tok_hash,
                     "final_norm_gain": None if gain is None else gain.float().cpu().numpy(),
                     "label_rule": result.label_rule if result is not None else None,
                     # the stored timings cover the whole run (load, plan, shards, merge), not this step
                     "timings": {**run_timings, "total": sum(run_timings.values())},
                     "progress": {"stage": "complete", **{k: v for k, v in counts.items() if k != "rows"},
                                  "rows": counts["rows"]}},
                fence=fence,
            )
            s.commit()  # releases the savepoint; the outer transaction commits below
    return timings


def with_attempts(engine: Engine, shard: Shard, work: Callable[[int], object], holder: str,
                  log: Callable[[str], None]) -> None:
    """Run ``work(attempt)`` on ``shard`` until one attempt succeeds; each failure is recorded on the
    shard, and the attempt cap ends it (ShardFailed)."""
    while True:
        attempt = lifecycle.claim(engine, shard, holder, lease_s=settings.shard_lease_s,
                                  max_attempts=settings.shard_max_attempts)
        try:
            work(attempt)
            return
        except Exception as exc:
            if isinstance(exc, lifecycle.RunStateError):
                raise
            lifecycle.fail_attempt(engine, shard, attempt, exc, max_attempts=settings.shard_max_attempts)
            log(f"{shard.kind} shard {shard.index}: attempt {attempt} failed: {lifecycle.one_line(exc)}")


def pending(shards: Iterable[Shard]) -> list[Shard]:
    return [s for s in shards if s.status != "done"]
