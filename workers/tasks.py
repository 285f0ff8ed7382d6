"""Celery tasks: argument mapping only; the work is in ``catalog.service``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from catalog.service import ExtractRequest, default_parameters, extract
from workers.celery_app import app

# Stable names: messages name the task, so moving a function must not strand queued work.
EXTRACT_CATALOG = "catalog.extract_catalog"


def request_from_message(request: dict[str, Any]) -> ExtractRequest:
    """The inverse of ``dataclasses.asdict(ExtractRequest(...))``; unknown keys raise ``TypeError``.

    Parameters the message leaves out come from this worker's settings (``CATALOG_*``), not from
    the dataclass defaults.
    """
    fields = dict(request)
    params = default_parameters(**(fields.pop("params", None) or {}))
    return ExtractRequest(**fields, params=params)


@app.task(name=EXTRACT_CATALOG)
def extract_catalog(request: dict[str, Any]) -> dict[str, Any]:
    """Extract and publish one catalog; ``request`` is ``asdict(ExtractRequest)``, the result ``asdict(RunSummary)``."""
    return asdict(extract(request_from_message(request)))
