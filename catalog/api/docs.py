"""``/docs``: Swagger UI 5 from the ``fastapi-swagger`` wheel's files, served by the app itself.

FastAPI's default page loads Swagger UI from a CDN: blank offline, and third-party script on the
origin of the cookie-authenticated review UI. Here every asset comes from this origin and the page
carries a CSP that allows nothing else (its starter is a file, not an inline script). ReDoc, which
no wheel ships, is not offered.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_swagger.resources
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-assets"
_STARTER = Path(__file__).with_name("docs_static")
# Only the wheel's dist files are used (not its app patching): the bundle, the stylesheet, the icon.
_ASSETS = Path(fastapi_swagger.resources.__file__).parent
# Swagger UI sets inline style attributes and shows data: images; scripts come only from here.
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png"></head>
<body data-openapi="{openapi}"><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/docs-init.js"></script></body></html>
"""


def mount_docs(app: FastAPI) -> None:
    """Add ``/docs`` and its assets to ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    from html import escape

    page = _PAGE.format(title=escape(app.title), assets=DOCS_ASSETS, openapi=escape(app.openapi_url or "/openapi.json"))
    headers = {"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "same-origin"}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    # The starter is ours (a route, matched before the mount); the rest is the wheel's resources.
    @app.get(f"{DOCS_ASSETS}/docs-init.js", include_in_schema=False)
    def docs_init() -> FileResponse:
        return FileResponse(_STARTER / "docs-init.js", media_type="text/javascript")

    app.mount(DOCS_ASSETS, StaticFiles(directory=_ASSETS), name="docs-assets")
