"""The Jinja2 environment of the UI (autoescaping on for every template) and the page context."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup, escape

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

# Characters a token chip would show as nothing (or as a plain space, so " Paris" looked like "Paris"):
# each is drawn as a visible marker whose title names the raw codepoint.
VISIBLE_MARKERS: dict[str, tuple[str, str]] = {
    " ": ("␣", "space"), "\n": ("↵", "newline"), "\t": ("⇥", "tab"), "\r": ("␍", "carriage return"),
    "\u00a0": ("⍽", "no-break space"), "\u200b": ("∅", "zero-width space"), "\ufeff": ("∅", "byte order mark"),
}


def _marker(ch: str) -> str | None:
    """The visible stand-in for a whitespace, control or zero-width character; None for the others."""
    if ch in VISIBLE_MARKERS:
        return VISIBLE_MARKERS[ch][0]
    cat = unicodedata.category(ch)
    if ch.isspace() or cat in ("Cc", "Cf", "Zs", "Zl", "Zp"):
        return "·" if ch.isspace() or cat.startswith("Z") else "¤"
    return None


def token_text(token: str | None) -> Markup:
    """A token for a chip, escaped, with every whitespace or invisible character drawn visibly
    (␣ space, ↵ newline, ⇥ tab, ⍽ no-break space, · other spaces, ¤ control, ∅ zero-width or the
    empty token), each in a span.ws whose title gives the codepoint. The one helper every template
    uses where a token is shown on its own."""
    if token is None:
        return Markup("")
    if token == "":
        return Markup('<span class="ws" title="empty token">∅</span>')
    out = []
    for ch in token:
        mark = _marker(ch)
        if mark is None:
            out.append(str(escape(ch)))
        else:
            name = VISIBLE_MARKERS[ch][1] if ch in VISIBLE_MARKERS else unicodedata.name(ch, "unnamed").lower()
            out.append(f'<span class="ws" title="U+{ord(ch):04X} {escape(name)}">{mark}</span>')
    return Markup("".join(out))


def token_codepoints(token: str | None) -> str:
    """The raw codepoints of a token, for a chip's title (plain text; the template escapes it)."""
    return " ".join(f"U+{ord(ch):04X}" for ch in token or "")


env.filters["tok"] = token_text
env.filters["codepoints"] = token_codepoints
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
