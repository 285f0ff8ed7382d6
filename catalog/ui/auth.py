"""Signing in to the UI (issue 15; README, "Design notes"): the annotator's token travels once in a POST
body and is checked; the browser then holds only a random session id in an HttpOnly, SameSite=Strict
cookie (``__Host-`` prefixed and Secure over https). The server keeps the id's SHA-256 with a random
per-session CSRF token (catalog.annotations.sessions). Cross-origin posts are refused before any route
by catalog.web_security; the CSRF token is a second, independent check on every form."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from catalog.annotations import sessions
from catalog.api.deps import SessionDep, api_engine
from catalog.config import settings
from catalog.read.errors import ReadError
from catalog.store.database import session_scope
from catalog.store.models import Annotator

log = logging.getLogger("catalog.ui")
COOKIE = "nc_session"
SECURE_COOKIE = "__Host-nc_session"  # the browser takes it only with Secure, Path=/ and no Domain


class CsrfFailed(ReadError):
    status = 403


def cookie_secure(request: Request) -> bool:
    """Whether the session cookie is Secure here: forced by CATALOG_COOKIE_SECURE, or (auto) when the
    request is https as uvicorn resolved it (X-Forwarded-Proto counts from its trusted proxies only)."""
    if settings.cookie_secure != "auto":
        return settings.cookie_secure == "true"
    return request.url.scheme == "https"


def cookie_name(request: Request) -> str:
    # Over https only the __Host- cookie is read: a plain one could have been planted by a sibling
    # host (cookie tossing) to sign the browser in as someone else.
    return SECURE_COOKIE if cookie_secure(request) else COOKIE


def session_id(request: Request) -> str | None:
    return request.cookies.get(cookie_name(request))


def set_session_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(cookie_name(request), value, max_age=int(settings.session_max_days * 86400), path="/",
                        secure=cookie_secure(request), httponly=True, samesite="strict")


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(cookie_name(request), path="/", secure=cookie_secure(request), httponly=True,
                           samesite="strict")


def resolve(request: Request, session: Session) -> Annotator | None:
    """Set ``request.state.user`` / ``csrf_token`` from the session cookie; the annotator or None."""
    active = sessions.lookup(session, session_id(request))
    request.state.user = active.annotator if active is not None else None
    request.state.csrf_token = active.csrf_token if active is not None else ""
    request.state.ui_session = active
    if active is not None:
        try:  # the idle limit counts from the last request; at most one short write a minute
            with session_scope(api_engine()) as s:
                sessions.touch(s, active)
        except Exception:  # a failed touch must not fail a page view; the session may just idle out sooner
            log.warning("could not record the UI session's last use", exc_info=True)
    return request.state.user


def page_user(request: Request, session: SessionDep) -> Annotator | None:
    """Dependency of every UI page: who is signed in (None for readers)."""
    return resolve(request, session)


def check_csrf(request: Request, sent: str | None) -> None:
    """The form's CSRF token must be this session's (call after ``resolve``)."""
    active = getattr(request.state, "ui_session", None)
    if active is None or not sent or not hmac.compare_digest(active.csrf_token.encode(), sent.encode()):
        raise CsrfFailed("the form's CSRF token is missing or wrong: reload the page and try again")


PageUser = Annotated[Annotator | None, Depends(page_user)]
