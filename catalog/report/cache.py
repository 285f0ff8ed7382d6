"""An in-memory cache of report figures for the UI: a run's figures never change once it is published
(a new extraction is a new run id), so a figure is computed once per run and rendered once; the
human-label figure is keyed by the annotations' stamp as well, since annotations change any time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TypeVar

from sqlalchemy.orm import Session

from catalog.report import build
from catalog.report import data as d

V = TypeVar("V")


def _put(store: OrderedDict[Hashable, V], k: Hashable, v: V, size: int) -> None:
    store[k] = v
    store.move_to_end(k)
    while len(store) > size:
        store.popitem(last=False)


class FigureCache:
    """Least-recently-used figure results and their PNGs, thread-safe (pages render in a thread pool)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._results: OrderedDict[Hashable, build.FigureResult] = OrderedDict()
        self._pngs: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, session: Session, ref: d.RunRef, key: str, layer: int | None) -> Hashable:
        spec = build.BY_KEY.get(key)
        stamp = d.annotation_stamp(session, ref) if spec is not None and spec.uses_annotations else None
        return (ref.run_id, key, layer, stamp)

    def result(self, session: Session, ref: d.RunRef, key: str, layer: int | None = None) -> build.FigureResult:
        """The figure (data and caption), computed on first use (NotFound for an unknown figure or layer)."""
        k = self._key(session, ref, key, layer)
        with self._lock:
            hit = self._results.get(k)
            if hit is not None:
                self._results.move_to_end(k)
                return hit
        result = build.figure(session, ref, key, layer)
        with self._lock:
            _put(self._results, k, result, self.size)
        return result

    def png(self, session: Session, ref: d.RunRef, key: str, layer: int | None = None) -> bytes:
        """The figure's PNG, rendered on first use (catalog.report.NothingToDraw when it has a note instead)."""
        k = self._key(session, ref, key, layer)
        with self._lock:
            hit = self._pngs.get(k)
            if hit is not None:
                self._pngs.move_to_end(k)
                return hit
        png = self.result(session, ref, key, layer).png()
        with self._lock:
            _put(self._pngs, k, png, self.size)
        return png

    def clear(self) -> None:
        with self._lock:
            self._results.clear()
            self._pngs.clear()
