"""EXPLAIN the statements a read-side call sends: how each kind of search is served by an index.

Used by ``bench/explain_search.py`` (docs/search-plans.md) and by the tests, which check that no
search kind needs a sequential scan of a large table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

# Statements that only look up the entry, its run or a token, or set options: not worth a plan.
_SKIP = ("set_config", "FROM catalog_models", "FROM extraction_runs", "websearch_to_tsquery(CAST",
         "SET LOCAL", "FROM tokens \nWHERE tokens.run_id", "FROM tokens WHERE run_id")


@dataclass
class Captured:
    statement: str
    parameters: Any


@contextmanager
def capture(engine: Engine) -> Iterator[list[Captured]]:
    """Record every statement executed on ``engine`` inside the block."""
    seen: list[Captured] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        seen.append(Captured(statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def plans(engine: Engine, call: Callable[[Session], Any], *, analyze: bool = True,
          settings: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(statement, EXPLAIN output) for each substantial statement ``call(session)`` sends.

    ``settings`` (e.g. ``{"enable_seqscan": "off"}``) apply to both the call and the EXPLAINs.
    """
    out: list[tuple[str, str]] = []
    with Session(bind=engine) as session:
        for name, value in (settings or {}).items():
            session.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
        session.execute(text("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)"))
        with capture(engine) as seen:
            call(session)
        for c in seen:
            if any(s in c.statement for s in _SKIP) or not c.statement.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            options = "ANALYZE, BUFFERS" if analyze else "COSTS"
            # exec_driver_sql: the captured statement is already in the driver's parameter style
            rows = session.connection().exec_driver_sql(f"EXPLAIN ({options}) {c.statement}", c.parameters).all()
            out.append((c.statement, "\n".join(r[0] for r in rows)))
        session.rollback()
    return out
