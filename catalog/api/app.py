"""The FastAPI application: routers, the health check, and errors as JSON ``{"detail": ...}``.

``neuron-catalog serve`` runs ``create_app()`` under uvicorn. Nothing here imports torch; the
probe route loads it on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from catalog import __version__
from catalog.api import annotations as annotation_routes
from catalog.api import probe, routes
from catalog.api.deps import api_engine
from catalog.api.docs import mount_docs
from catalog.api.edge import EdgeGuard
from catalog.api.limits import Limits, LimitState
from catalog.read.catalog import NO_SCHEMA
from catalog.read.errors import ReadError
from catalog.store.database import DatabaseUnavailable
from catalog.web_security import OriginCheck

log = logging.getLogger("catalog.api")
API_PREFIX = "/api/v1"


def _describe(err: dict[str, Any]) -> str:
    raw_loc = tuple(err.get("loc", ()))
    loc = [str(x) for x in raw_loc if x not in ("query", "path", "body")]
    where = ".".join(loc) or "request"
    kind = err.get("type")
    if kind == "extra_forbidden":
        if raw_loc[:1] == ("body",):
            return f"{where}: unknown field (see /docs for this body's fields)"
        return f"{where}: unknown parameter (see /docs for the parameters, e.g. min_<statistic>)"
    if kind == "literal_error":
        # A long list of allowed values (e.g. every sort key) would make a 1 kB line: name a few.
        allowed = str((err.get("ctx") or {}).get("expected", ""))
        if len(allowed) > 120:
            shown = ", ".join(allowed.split(", ")[:4])
            return f"{where}: {err.get('input')!r} is not allowed; one of {shown}, ... (all values in /docs)"
    return f"{where}: {err.get('msg', 'invalid')}"


def create_app() -> FastAPI:
    app = FastAPI(
        docs_url=None,  # served from the app's own copy of Swagger UI (catalog/api/docs.py), not a CDN
        redoc_url=None,
        title="Neuron Catalog",
        version=__version__,
        description="Search what each feed-forward neuron of a transformer stores (Geva et al. 2021): "
                    "by trigger pattern, promoted token, layer or statistic. Layers and neurons are 0-based.",
    )
    app.include_router(routes.router, prefix=API_PREFIX)
    app.include_router(probe.router, prefix=API_PREFIX)
    app.include_router(annotation_routes.router, prefix=API_PREFIX)
    # The review UI (part 4): pages at /, their script and stylesheets at /static.
    from fastapi import Depends
    from fastapi.staticfiles import StaticFiles

    from catalog.ui import auth, figure_pages, pages
    from catalog.ui.templating import STATIC_DIR

    app.include_router(pages.router)
    app.include_router(figure_pages.router, dependencies=[Depends(auth.page_user)])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(OriginCheck)  # cross-origin POST/PUT/PATCH/DELETE: 403 (catalog/web_security.py)
    mount_docs(app)
    # Per-client rate limit and bounded expensive requests (catalog/api/limits.py); the state is the tests' window.
    app.state.limits = LimitState()
    app.add_middleware(Limits, state=app.state.limits)
    # Outermost: a NUL, a control character in the path or an oversized URL never reaches a route.
    app.add_middleware(EdgeGuard)

    @app.get("/healthz", tags=["health"], responses={503: routes.ERRORS[503]})
    def healthz() -> dict[str, str]:
        """The service is up and its database answers."""
        with api_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.exception_handler(ReadError)
    def read_error(_: Request, exc: ReadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):  # the body is not JSON at all: 400, as declared
            return JSONResponse({"detail": "body: not valid JSON (send Content-Type: application/json and a JSON object)"},
                                status_code=400)
        return JSONResponse({"detail": "; ".join(_describe(e) for e in errors)}, status_code=422)

    @app.exception_handler(DatabaseUnavailable)
    def unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(DBAPIError)
    def database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        code = getattr(exc.orig, "sqlstate", None) or ""
        if isinstance(exc, ProgrammingError) and code == "42P01":  # undefined table: no schema yet
            return JSONResponse({"detail": NO_SCHEMA}, status_code=503)
        if code == "57014":  # query_canceled: statement_timeout
            return JSONResponse({"detail": "the query took too long and was cancelled; narrow the search"},
                                status_code=503)
        if isinstance(exc, OperationalError):
            return JSONResponse({"detail": "the database is unavailable"}, status_code=503)
        log.exception("database error", exc_info=exc)
        return JSONResponse({"detail": f"database error ({code or type(exc.orig).__name__})"}, status_code=500)

    return app
