"""Input checks at the edge, before any route: what no route may ever see.

Postgres ``text`` cannot hold NUL, so a NUL anywhere in a request would reach the database as an
error (a 500). One ASGI middleware turns it, and the other malformed shapes below, into a one-line
JSON 4xx for every route at once, API and UI alike:

- a URL longer than ``MAX_URL`` bytes: 414;
- a control character (U+0000-U+001F, U+007F) in the path: 404 (no catalog entry, annotator or page
  has such a name);
- NUL in a query parameter, a form field or a JSON string: 422 naming the parameter. Other control
  characters stay allowed there: ``token=text:\\n`` names a real vocabulary entry;
- a body over ``MAX_BODY`` bytes: 413.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_URL = 8_192
MAX_BODY = 1_048_576  # the largest body a route takes (an annotation, a probe text) is far below
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class EdgeError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _nul_in_json(value: Any, where: str) -> str | None:
    """The location of the first string (key or value) holding NUL, or None."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return f"{where}.<key>"
            found = _nul_in_json(v, f"{where}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_in_json(v, f"{where}.{i}")
            if found:
                return found
    return None


def check_target(path: str, raw_path: bytes, query_string: bytes) -> None:
    """Raise EdgeError for a URL no route should see (its length, control characters, NUL)."""
    if len(raw_path) + len(query_string) > MAX_URL:
        raise EdgeError(414, f"the URL is longer than {MAX_URL} bytes")
    found = _CONTROL.search(path)
    if found:
        raise EdgeError(404, f"no such resource: the path holds a control character (U+{ord(found.group()):04X})")
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            name = key.replace("\x00", "\\x00")[:40]
            raise EdgeError(422, f"{name}: NUL characters are not allowed (give a token by id:N)")


def check_body(content_type: str, body: bytes) -> None:
    """Raise EdgeError for NUL in a form field or a JSON string. Bodies that do not parse are left to
    the route, which answers them itself (400 for JSON)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        for key, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True):
            if "\x00" in key or "\x00" in value:
                raise EdgeError(422, f"{key.replace(chr(0), '')[:40] or 'form'}: NUL characters are not allowed")
    elif kind == "application/json" or kind.endswith("+json"):
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        where = _nul_in_json(parsed, "body")
        if where:
            raise EdgeError(422, f"{where}: NUL characters are not allowed")
    elif b"\x00" in body and kind.startswith("text/"):
        raise EdgeError(422, "body: NUL characters are not allowed")


class EdgeGuard:
    """ASGI middleware applying :func:`check_target` and :func:`check_body` to every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_target(scope.get("path", ""), scope.get("raw_path") or b"", scope.get("query_string") or b"")
        except EdgeError as exc:
            await _answer(send, exc)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        # Read the whole body (bounded), check it, then hand the route a replay of it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _answer(send, EdgeError(413, f"the request body is larger than {MAX_BODY} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = dict(scope.get("headers") or [])
        try:
            check_body(headers.get(b"content-type", b"").decode("latin-1"), body)
        except EdgeError as exc:
            await _answer(send, exc)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, exc: EdgeError) -> None:
    payload = json.dumps({"detail": exc.detail}).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
