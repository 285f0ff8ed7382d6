"""Celery tasks: argument mapping only; the work is in ``catalog.runs`` and ``catalog.requests``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery.exceptions import Ignore
from celery.utils.log import get_task_logger
from kombu.utils.url import maybe_sanitize_url

from catalog import requests
from catalog.requests import request_from_message
from catalog.runs.local import extract
from catalog.store.migrate import require_head
from workers.celery_app import app

__all__ = ["EXTRACT_CATALOG", "RUN_REQUEST", "BrokerUnavailable", "request_from_message", "send_request"]

# Stable names: messages name the task, so moving a function must not strand queued work.
EXTRACT_CATALOG = "catalog.extract_catalog"
RUN_REQUEST = "catalog.run_extraction_request"

logger = get_task_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached; the message is one line, fit to show a user."""


@app.task(name=EXTRACT_CATALOG)
def extract_catalog(request: dict[str, Any]) -> dict[str, Any]:
    """Extract and publish one catalog; ``request`` is ``asdict(ExtractRequest)``, the result ``asdict(RunSummary)``.

    Kept for callers that send a request by value; ``extract --distributed`` uses ``run_extraction_request``.
    """
    require_head()  # workers never migrate
    return asdict(extract(request_from_message(request)))


@app.task(name=RUN_REQUEST, ignore_result=True)
def run_extraction_request(request_id: int) -> str:
    """Run the ``extraction_requests`` row ``request_id`` (catalog/requests.py); the row is the result.

    A delivery whose request a live worker holds is a duplicate: ``Ignore`` acks it and does nothing.
    """
    outcome = requests.run_request(int(request_id), log=logger.info)
    if outcome is requests.Outcome.held:
        raise Ignore()
    return outcome.value


def send_request(request_id: int) -> None:
    """Send (or re-send: the sweeper) the task of a request; its task id is the request id."""
    try:
        app.send_task(RUN_REQUEST, args=[request_id], task_id=str(request_id), ignore_result=True)
    except Exception as exc:  # kombu's OperationalError and the socket errors under it
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BrokerUnavailable(
            f"cannot reach the broker at {maybe_sanitize_url(app.conf.broker_url)}: {reason}"
        ) from exc
