"""The Celery application: Redis broker (``CATALOG_BROKER_URL``) and its settings.

Start a worker with ``celery -A workers.celery_app worker``. An extraction is long and writes a new
run that is published atomically, so running it twice is harmless (the second run replaces the
first): that is what makes late acknowledgement safe here.
"""

from __future__ import annotations

from celery import Celery

from catalog.config import settings

# Redis re-delivers a message that is still unacknowledged after this long, even while a live worker
# is still running it; it must exceed the longest single task, or a long extraction would be started
# a second time on another worker. The price: a task on a worker that was SIGKILLed or lost power
# waits this long to be re-delivered (a clean shutdown returns held messages at once). Part 3's short
# per-layer/per-shard tasks allow a much shorter timeout.
VISIBILITY_TIMEOUT_S = 24 * 3600


def create_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url``; Redis also holds the results (part 3 merges shard results in chords)."""
    app = Celery("neuron_catalog", broker=broker_url, backend=broker_url, include=["workers.tasks"])
    app.conf.update(
        # JSON only: messages stay readable by any client and no pickle payload is ever executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Acknowledge after the task finishes, and put the message back if the worker process dies
        # mid-task, so a lost worker's extraction runs again elsewhere.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One long task at a time per worker process: no message waits behind a running extraction.
        worker_prefetch_multiplier=1,
        task_track_started=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
    )
    return app


app = create_app(settings.broker_url)
