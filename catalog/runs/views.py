"""Runs as people and scripts read them (`neuron-catalog runs`, `runs show`): torch-free, read-only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from catalog.store.models import CatalogModel, ExtractionRun, RunShard, ShardKind, ShardStatus


@dataclass
class ShardView:
    kind: str
    index: int
    doc_start: int
    doc_stop: int
    tokens: int  # planned: corpus tokens (pass) or trigger prefixes (ablation)
    status: str
    attempts: int
    holder: str | None
    lease_expires_at: str | None
    done_tokens: int
    seconds: float | None
    state_bytes: int | None
    error: str | None


@dataclass
class RunView:
    run_id: int
    name: str
    status: str
    step: str | None
    current: bool
    started_at: str
    finished_at: str | None
    corpus: str | None
    error: str | None
    stage: str | None
    shards_done: int
    shards_total: int
    tokens_done: int = 0
    tokens_total: int = 0
    tokens_per_s: float | None = None
    eta_s: float | None = None
    plan: dict[str, Any] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardView] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def list_runs(s: Session) -> list[RunView]:
    """Every run, oldest first, with its shards done / total (both kinds)."""
    names = dict(s.execute(select(CatalogModel.id, CatalogModel.name)).tuples().all())
    current = set(s.scalars(select(CatalogModel.current_run_id)))
    counts: dict[int, tuple[int, int]] = {
        r: (int(d), int(t)) for r, d, t in s.execute(
            select(RunShard.run_id, func.count().filter(RunShard.status == ShardStatus.done.value), func.count())
            .group_by(RunShard.run_id)).tuples()}
    out = []
    for r in s.scalars(select(ExtractionRun).order_by(ExtractionRun.id)):
        done, total = counts.get(r.id, (0, 0))
        out.append(RunView(
            run_id=r.id, name=names.get(r.model_id, "?"), status=r.status.value, step=r.step, current=r.id in current,
            started_at=r.started_at.isoformat(), finished_at=_iso(r.finished_at),
            corpus=(r.corpus or {}).get("source"), error=r.error, stage=(r.progress or {}).get("stage"),
            shards_done=done, shards_total=total, plan=r.plan, timings=dict(r.timings or {}),
        ))
    return out


def show_run(s: Session, run_id: int) -> RunView | None:
    """One run with its plan and every shard; tokens/s and an ETA from the pass shards while it runs."""
    found = [v for v in list_runs(s) if v.run_id == run_id]
    if not found:
        return None
    view = found[0]
    rows = s.scalars(select(RunShard).where(RunShard.run_id == run_id)
                     .order_by(RunShard.kind.desc(), RunShard.index)).all()  # pass shards, then ablation
    view.shards = [ShardView(
        kind=r.kind, index=r.index, doc_start=r.doc_start, doc_stop=r.doc_stop, tokens=r.tokens, status=r.status,
        attempts=r.attempts, holder=r.holder, lease_expires_at=_iso(r.lease_expires_at), done_tokens=r.done_tokens,
        seconds=r.seconds, state_bytes=r.state_bytes, error=r.error) for r in rows]
    passes = [r for r in rows if r.kind == ShardKind.pass_.value]
    view.tokens_total = sum(r.tokens for r in passes)
    view.tokens_done = sum(r.tokens if r.status == ShardStatus.done.value else r.done_tokens for r in passes)
    # the rate of the shards finished in this run's pass: their tokens over their seconds
    finished = [r for r in passes if r.status == ShardStatus.done.value and r.seconds]
    if finished:
        view.tokens_per_s = sum(r.tokens for r in finished) / sum(float(r.seconds or 0) for r in finished)
    elif passes:
        running = [r for r in passes if r.status == ShardStatus.running.value and r.started_at and r.done_tokens]
        if running:
            elapsed = sum((datetime.now(UTC) - r.started_at).total_seconds() for r in running if r.started_at)
            view.tokens_per_s = sum(r.done_tokens for r in running) / max(elapsed, 1e-9)
    if view.status == "running" and view.tokens_per_s:
        view.eta_s = (view.tokens_total - view.tokens_done) / view.tokens_per_s
    return view


def summary_line(v: RunView) -> str:
    mark = "*" if v.current else " "
    shards = f"shards {v.shards_done}/{v.shards_total}" if v.shards_total else "no shards"
    started = datetime.fromisoformat(v.started_at)
    return (f"{mark} run {v.run_id:>4}  {v.name:<30} {v.status:<11} {shards:<14} started {started:%Y-%m-%d %H:%M}"
            f"  corpus {v.corpus or '-'}" + (f"  error: {v.error}" if v.error else ""))


def detail_lines(v: RunView) -> list[str]:
    lines = [summary_line(v)]
    lines.append(f"  step {v.step or '-'}; stage {v.stage or '-'}")
    if v.plan:
        lines.append(f"  plan: {v.plan.get('tokens')} tokens of {v.plan.get('documents')} documents in "
                     f"{v.plan.get('shards')} pass shard(s) of up to {v.plan.get('shard_tokens')} tokens"
                     + (f"; document {v.plan['cut'][0]} cut at {v.plan['cut'][1]} tokens" if v.plan.get("cut") else ""))
    if v.tokens_total:
        rate = f"{v.tokens_per_s:,.0f} tok/s" if v.tokens_per_s else "rate unknown"
        eta = f", ETA {v.eta_s:,.0f} s" if v.eta_s is not None else ""
        lines.append(f"  corpus pass: {v.tokens_done}/{v.tokens_total} tokens, {rate}{eta}")
    for sh in v.shards:
        size = "tokens" if sh.kind == ShardKind.pass_.value else "prefixes"
        lines.append(
            f"  {sh.kind:<8} {sh.index:>4}  docs {sh.doc_start}-{sh.doc_stop - 1}  {sh.tokens} {size}  {sh.status:<7} "
            f"attempts {sh.attempts}" + (f"  {sh.seconds:.1f}s" if sh.seconds is not None else "")
            + (f"  state {sh.state_bytes / 1e6:.2f} MB" if sh.state_bytes else "")
            + (f"  held by {sh.holder}" if sh.status == ShardStatus.running.value and sh.holder else "")
            + (f"  by {sh.holder}" if sh.status == ShardStatus.done.value and sh.holder else "")
            + (f"  error: {sh.error}" if sh.error else ""))
    if v.timings:
        lines.append("  timings: " + ", ".join(f"{k} {float(t):.1f}s" for k, t in v.timings.items()
                                              if isinstance(t, int | float)))
    return lines


FOLLOW_POLL_S = 0.5
ENDED = ("complete", "superseded", "failed", "cancelled", "interrupted")


def follow_run(run_id: int, on_view: Callable[[RunView], None], engine: Engine | None = None,
               poll_s: float = FOLLOW_POLL_S) -> RunView:
    """Read the run (with its shards) every ``poll_s`` until it ends, calling ``on_view`` each time;
    returns its last view."""
    from catalog.store.database import get_engine

    engine = engine or get_engine()
    while True:
        with Session(engine) as s:
            v = show_run(s, run_id)
        if v is None:
            raise LookupError(f"run {run_id} does not exist")
        on_view(v)
        if v.status in ENDED:
            return v
        time.sleep(poll_s)


def holders(v: RunView) -> str:
    """Which worker holds what, e.g. ``w1:12 pass 3; w2:40 pass 4``."""
    held = [f"{sh.holder} {sh.kind} {sh.index}" for sh in v.shards if sh.status == ShardStatus.running.value and sh.holder]
    return "; ".join(held)


def bar_figures(v: RunView) -> tuple[str, int, int, str]:
    """(what, done, total, detail) for a live progress bar: pass tokens, then ablation shards."""
    if v.step in ("merge", "finish", "done"):
        who = holders(v)
        return v.step or "-", 0, 0, f"{v.stage or 'queued'}" + (f" [{who}]" if who else "")
    kind = ShardKind.ablation.value if v.step == "ablation" else ShardKind.pass_.value
    mine = [sh for sh in v.shards if sh.kind == kind]
    done = sum(1 for sh in mine if sh.status == ShardStatus.done.value)
    detail = f"{v.step or '-'}: shards {done}/{len(mine)}"
    if kind == ShardKind.pass_.value and v.tokens_per_s:
        detail += f", {v.tokens_per_s:,.0f} tok/s" + (f", ETA {v.eta_s:,.0f}s" if v.eta_s is not None else "")
    who = holders(v)
    if who:
        detail += f" [{who}]"
    if kind == ShardKind.pass_.value:
        return "corpus pass", v.tokens_done, v.tokens_total, detail
    return "ablation", done, len(mine), detail
