"""Slow requests cannot take the whole service with them (part 6).

Two limits, one ASGI middleware, per server process:

- **Expensive kinds** (a pattern search: any request with a non-empty ``q``; token ranking; similar
  neurons; the probe) run at most ``expensive_concurrency`` at a time. One more waits up to
  ``expensive_wait_s`` for a slot, in the event loop (holding neither a worker thread nor a database
  connection), then is answered 429 with ``Retry-After``. With the slots below the API engine's
  connection pool (5 + 10 overflow), /healthz and cheap requests always find a connection and a
  thread, however many expensive ones arrive.
- **Per client IP**, a token bucket over every request but /healthz and /static: ``rate_limit_per_s``
  on average, bursts of ``rate_limit_burst``; beyond, 429 with ``Retry-After`` (seconds until one
  request is allowed again). The IP is the connection's, or, behind a proxy that uvicorn trusts
  (``--forwarded-allow-ips``), the forwarded one.

Refusals are JSON ``{"detail": "..."}`` like every other error.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from catalog.config import settings

Scope = dict[str, Any]
MAX_CLIENTS = 10_000  # buckets kept; full (idle) ones are dropped beyond this
EXEMPT = ("/healthz", "/static/")


def expensive_kind(scope: Scope) -> str | None:
    """The expensive kind of a request, or None for a cheap one."""
    path: str = scope.get("path", "")
    if path.endswith("/probe") and scope.get("method") == "POST":
        return "probe"
    if path.endswith("/similar"):
        return "similar"
    if "/tokens/" in path and path.endswith("/neurons"):
        return "token ranking"
    qs: bytes = scope.get("query_string") or b""
    if b"q=" in qs and any(k == "q" and v.strip() for k, v in parse_qsl(qs.decode("latin-1"))):
        return "pattern search"
    return None


@dataclass
class LimitState:
    """The limits of one app and what they saw (``high_water``: most expensive requests running at once)."""

    concurrency: int = field(default_factory=lambda: settings.expensive_concurrency)
    wait_s: float = field(default_factory=lambda: settings.expensive_wait_s)
    rate_per_s: float = field(default_factory=lambda: settings.rate_limit_per_s)
    burst: int = field(default_factory=lambda: settings.rate_limit_burst)
    running: int = 0
    high_water: int = 0
    refused_busy: int = 0
    refused_rate: int = 0
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, at)
    _semaphore: asyncio.Semaphore | None = None

    def take(self, client: str, now: float | None = None) -> float:
        """Spend one request of ``client``'s bucket: 0 when allowed, else the seconds until it would be."""
        if self.rate_per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        self.buckets[client] = (tokens - 1.0, now)
        if len(self.buckets) > MAX_CLIENTS:
            full = [c for c, (t, a) in self.buckets.items() if t + (now - a) * self.rate_per_s >= self.burst]
            for c in full:
                del self.buckets[c]
        return 0.0

    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # made on first use, inside the server's event loop
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._semaphore


async def _refuse(send: Any, detail: str, retry_after: float) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, math.ceil(retry_after))).encode())]})
    await send({"type": "http.response.body", "body": body})


class Limits:
    """ASGI middleware applying a :class:`LimitState`."""

    def __init__(self, app: Any, state: LimitState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == EXEMPT[0] or path.startswith(EXEMPT[1]):
            await self.app(scope, receive, send)
            return
        st = self.state
        client = (scope.get("client") or ("unknown",))[0]
        wait = st.take(client)
        if wait > 0:
            st.refused_rate += 1
            await _refuse(send, f"too many requests from {client}: at most {st.rate_per_s:g} a second "
                                f"(bursts of {st.burst}); retry after {max(1, math.ceil(wait))} s", wait)
            return
        kind = expensive_kind(scope)
        if kind is None:
            await self.app(scope, receive, send)
            return
        sem = st.semaphore()
        try:
            await asyncio.wait_for(sem.acquire(), timeout=st.wait_s)
        except TimeoutError:
            st.refused_busy += 1
            await _refuse(send, f"busy: {st.concurrency} expensive requests (pattern search, token ranking, "
                                f"similar, probe) are running; this {kind} waited {st.wait_s:g} s; retry after 1 s", 1)
            return
        st.running += 1
        st.high_water = max(st.high_water, st.running)
        try:
            await self.app(scope, receive, send)
        finally:
            st.running -= 1
            sem.release()
