"""The Celery application: Redis broker (``CATALOG_BROKER_URL``), its settings and the worker's hooks.

Start a worker with ``neuron-catalog worker`` (or ``celery -A workers.celery_app worker``). Both
refuse to start unless the database's schema revision is this code's head: workers never migrate.
Each worker runs a sweeper (catalog/requests.py) that re-sends the distributed requests whose worker
died. A request's message may be delivered more than once; its row's advisory lock and fenced
publish (catalog/requests.py) make every extra delivery a no-op, which is what makes late
acknowledgement safe here.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, signals

from catalog.config import settings

# Redis re-delivers a message that is still unacknowledged after this long, even while a live worker
# is still running it (the duplicate finds the request locked and is dropped). A SIGKILLed or lost
# worker's message waits this long to come back (a clean shutdown returns held messages at once);
# the sweeper re-sends its request long before. CATALOG_VISIBILITY_TIMEOUT_S.
VISIBILITY_TIMEOUT_S = settings.visibility_timeout_s


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


_schema_checked: list[str] = []


@signals.celeryd_init.connect  # `celery worker`: before anything else is printed
@signals.worker_init.connect  # any other way a WorkController starts
def _refuse_another_schema(**_: Any) -> None:
    """A worker on a database of another schema revision exits at once, with one ``error:`` line."""
    from catalog.store.database import DatabaseUnavailable
    from catalog.store.migrate import SchemaMismatch, require_head

    if _schema_checked:
        return
    try:
        _schema_checked.append(require_head())
    except (SchemaMismatch, DatabaseUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


_sweepers: list[Any] = []


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    """In the worker's main process (with the default prefork pool it runs no task itself): re-send
    the requests, shards and steps of dead workers, and lost messages."""
    from catalog.requests import Sweeper
    from catalog.runs.lifecycle import dispatch
    from workers.tasks import CelerySender, send_request

    sender = CelerySender()
    sweeper = Sweeper(send_request, settings.sweep_interval_s, also=(lambda e: dispatch(e, sender),))
    sweeper.start()
    _sweepers.append(sweeper)


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    for sweeper in _sweepers:
        sweeper.stop()
