"""What an extraction is asked to do and what it reports: torch-free, so that requests, run rows and
the CLI can carry them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.extract.params import Parameters


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
    # corpus tokens per pass shard (whole documents); None: settings.shard_tokens
    shard_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExtractRequest:
        """The inverse of ``to_json``; parameters missing from ``data`` (older writers) take the defaults.

        Unknown keys raise TypeError, so a request written by a newer version is refused, not misread.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TypeError(f"unknown request field(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        values["params"] = default_parameters(**values.get("params", {}))
        return cls(**values)


@dataclass
class RunSummary:
    run_id: int
    name: str
    n_layers: int
    d_mlp: int
    timings: dict[str, float]
    counts: dict[str, Any]
    reused_shards: int = 0  # shards a resume found done and did not recompute


# Test hook: called with a stage name as each stage starts (lets tests interrupt a run mid-way).
StageHook = Callable[[str], None]


class Fence(Protocol):
    """Ties a run to a claim held outside this package (a distributed request, catalog/requests.py).

    Each hook runs inside the transaction it is named after and may raise to abort it: ``registered``
    in the one that creates the run row (before its liveness lock is taken), ``publishing`` in the
    one that publishes the run, after the catalog rows and the run's new state are in place and
    before the commit, so the claim's check and its own change commit (or roll back) with the catalog.
    """

    def registered(self, session: Session, run_id: int) -> None: ...

    def publishing(self, session: Session, run_id: int) -> None: ...


class Sender(Protocol):
    """Sends the messages of a queue-driven run (workers/tasks.py); each names ids only."""

    def shard(self, run_id: int, kind: str, index: int) -> None: ...

    def step(self, run_id: int, step: str) -> None: ...
