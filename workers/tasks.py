"""Celery tasks: argument mapping only; the work is in ``catalog.runs`` and ``catalog.requests``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery.exceptions import Ignore
from celery.utils.log import get_task_logger
from kombu.utils.url import maybe_sanitize_url

from catalog import requests
from catalog.requests import request_from_message
from catalog.runs import queued
from catalog.runs.local import extract
from catalog.store.migrate import require_head
from workers.celery_app import app

__all__ = ["EXTRACT_CATALOG", "RUN_REQUEST", "RUN_SHARD", "RUN_STEP", "BrokerUnavailable", "CelerySender",
           "request_from_message", "send_request"]

# Stable names: messages name the task, so moving a function must not strand queued work.
EXTRACT_CATALOG = "catalog.extract_catalog"
RUN_REQUEST = "catalog.run_extraction_request"
RUN_SHARD = "catalog.run_shard"
RUN_STEP = "catalog.run_step"

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
    outcome = requests.run_request(int(request_id), sender=CelerySender(), log=logger.info)
    if outcome is requests.Outcome.held:
        raise Ignore()
    return outcome.value


@app.task(name=RUN_SHARD, ignore_result=True)
def run_shard(run_id: int, kind: str, index: int) -> str:
    """One shard of a queue-driven run (catalog/runs/queued.py). A delivery while a live attempt
    holds the shard is a duplicate: ``Ignore`` acks it and does nothing."""
    outcome = queued.run_shard(int(run_id), str(kind), int(index), sender=CelerySender(), log=logger.info,
                               ended=requests.settle)
    logger.info("run %s %s shard %s: %s", run_id, kind, index, outcome)
    if outcome == "held":
        raise Ignore()
    return outcome


@app.task(name=RUN_STEP, ignore_result=True)
def run_step(run_id: int, step: str) -> str:
    """The merge or finish step of a queue-driven run (catalog/runs/queued.py)."""
    outcome = queued.run_step(int(run_id), str(step), sender=CelerySender(), log=logger.info,
                              ended=requests.settle, fence=requests.RunRequestFence())
    logger.info("run %s step %s: %s", run_id, step, outcome)
    return outcome


def shard_task_id(run_id: int, kind: str, index: int) -> str:
    """One id per shard, whatever the attempt: ``runs cancel`` revokes by it."""
    return f"run-{run_id}-{kind}-{index}"


def step_task_id(run_id: int, step: str) -> str:
    return f"run-{run_id}-{step}"


def _send(name: str, args: list[Any], task_id: str) -> None:
    try:
        app.send_task(name, args=args, task_id=task_id, ignore_result=True)
    except Exception as exc:  # kombu's OperationalError and the socket errors under it
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BrokerUnavailable(
            f"cannot reach the broker at {maybe_sanitize_url(app.conf.broker_url)}: {reason}"
        ) from exc


def send_request(request_id: int) -> None:
    """Send (or re-send: the sweeper) the task of a request; its task id is the request id."""
    _send(RUN_REQUEST, [request_id], str(request_id))


class CelerySender:
    """``catalog.runs.schemas.Sender`` over this app's broker."""

    def shard(self, run_id: int, kind: str, index: int) -> None:
        _send(RUN_SHARD, [run_id, kind, index], shard_task_id(run_id, kind, index))

    def step(self, run_id: int, step: str) -> None:
        _send(RUN_STEP, [run_id, step], step_task_id(run_id, step))


def revoke_run(run_id: int, pieces: list[tuple[str, int]], steps: tuple[str, ...] = ("merge", "finish")) -> None:
    """Tell the live workers to drop the run's queued messages (best effort: a worker that starts
    later, or misses the broadcast, finds the run cancelled and drops the message itself)."""
    ids = [shard_task_id(run_id, k, i) for k, i in pieces] + [step_task_id(run_id, s) for s in steps]
    app.control.revoke(ids)
