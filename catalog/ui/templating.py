"""The Jinja2 environment of the UI (autoescaping on for every template) and the page context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from catalog import __version__

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,  # corpus prefixes are untrusted: everything is escaped unless marked safe
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
env.globals["version"] = __version__


def _fmt(value: Any, digits: int = 3) -> str:
    """A figure for a table cell: '-' for missing, fixed decimals, integers as they are."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        v = float(value)
        if v != 0 and abs(v) < 10 ** -digits:  # a tiny figure keeps its significant digits
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


env.filters["fmt"] = _fmt
env.filters["tojson_attr"] = lambda v: json.dumps(v)  # still escaped by autoescape when used in attributes


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """Render ``template`` with the page context (signed-in annotator, CSRF token) merged in."""
    ctx = {"request": request, "user": getattr(request.state, "user", None),
           "csrf_token": getattr(request.state, "csrf_token", ""), "title": "Neuron Catalog"}
    ctx.update(context)
    return HTMLResponse(env.get_template(template).render(ctx), status_code=status_code, headers=SECURITY_HEADERS)


# Scripts only from this origin, no inline script or event handler attribute: even text that slipped
# past escaping could not run. Inline styles stay allowed (SVG plots use them).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
