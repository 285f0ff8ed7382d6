"""Cross-origin state changes are refused (issue 15; README, "Design notes").

Every POST, PUT, PATCH and DELETE (UI form posts, sign-in included, and the JSON API) must come from
this site: its ``Origin`` header, or failing that its ``Referer``'s origin, must be the request's own
origin (the scheme as uvicorn resolved it, X-Forwarded-Proto from its trusted proxies included, and the
Host header; X-Forwarded-Host is not read) or one of ``CATALOG_TRUSTED_ORIGINS``. ``Origin: null``
(sandboxed frames, some redirects) is refused. A request with neither header is let through only when
a cross-site page could not have sent it: it carries no cookie and is not a form body (a browser's
cross-origin JSON or Authorization header needs a CORS preflight this app never grants). So scripts
and curl with ``Authorization: Bearer`` work unchanged, and a browser page elsewhere can neither sign
a visitor in as someone else (login CSRF) nor act in their session.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from catalog.config import settings

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What an HTML form (or a no-cors fetch) elsewhere can send without a preflight.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` (lower case, default port dropped) of an origin or URL; None when it has
    none (``null``, a relative or non-http URL, a bad port)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def own_origin(request: Request) -> str | None:
    return normalize_origin(f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}")


def allowed_origins(request: Request) -> set[str]:
    extra = {normalize_origin(o) for o in settings.trusted_origins.replace(",", " ").split()}
    return {o for o in (own_origin(request), *extra) if o}


def refusal(request: Request) -> str | None:
    """Why this state-changing request is refused, or None when it may go on."""
    origin = request.headers.get("origin")
    referer = request.headers.get("referer")
    if origin is not None:
        claimed, what = origin, "Origin"
    elif referer is not None:
        claimed, what = referer, "Referer"
    else:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.headers.get("cookie") or content_type in FORM_TYPES:
            return ("cross-origin check: a form post or a request with cookies must carry an Origin or Referer "
                    "header (send Authorization: Bearer without cookies from scripts)")
        return None
    if normalize_origin(claimed) in allowed_origins(request):
        return None
    shown = claimed if len(claimed) <= 100 else claimed[:100] + "..."
    return f"cross-origin request refused: {what} {shown!r} is not this site"


class OriginCheck:
    """ASGI middleware: 403 for a POST/PUT/PATCH/DELETE that ``refusal`` refuses (JSON ``{"detail"}`` under
    /api and for non-HTML clients, the UI's error page for browsers' form posts)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        why = refusal(request)
        if why is None:
            await self.app(scope, receive, send)
            return
        response: Response
        if not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", ""):
            from catalog.ui.templating import render

            response = render(request, "ui_error.html", {"title": "Refused", "status": 403, "message": why},
                              status_code=403)
        else:
            response = JSONResponse({"detail": why}, status_code=403)
        await response(scope, receive, send)
