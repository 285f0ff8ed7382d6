"""Run liveness without torch: the advisory lock a live extraction holds, and reaping runs whose process died.

``catalog.service`` takes the lock; ``neuron-catalog runs`` (in the torch-free API image too) reaps.
"""

from __future__ import annotations

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine

from catalog.store.database import get_engine
from catalog.store.models import ExtractionRun, RunStatus

# First key of the two-int advisory lock a live run holds (the second is the run id).
RUN_LOCK_CLASS = 0x4E43  # "NC"
INTERRUPTED = "interrupted: the extracting process ended before finishing (killed or lost); nothing was published"


def reap_stale_runs(engine: Engine | None = None) -> list[int]:
    """Mark ``running`` runs whose process is gone as failed; returns their ids."""
    engine = engine or get_engine()
    stale = []
    with engine.connect() as conn:
        for run_id in conn.scalars(select(ExtractionRun.id).where(ExtractionRun.status == RunStatus.running)).all():
            if conn.scalar(text("SELECT pg_try_advisory_lock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run_id}):
                conn.execute(text("SELECT pg_advisory_unlock(:c, :r)"), {"c": RUN_LOCK_CLASS, "r": run_id})
                stale.append(run_id)
        if stale:
            conn.execute(
                update(ExtractionRun)
                .where(ExtractionRun.id.in_(stale), ExtractionRun.status == RunStatus.running)
                .values(status=RunStatus.failed, error=INTERRUPTED, finished_at=func.now())
            )
        conn.commit()
    return stale
