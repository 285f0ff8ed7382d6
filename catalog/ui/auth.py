"""Signing in to the UI: the annotator's token travels once in a POST body and is kept in an HttpOnly,
SameSite=Strict cookie (never in a URL or a log); every form post carries a CSRF token derived from it."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from catalog.annotations import service
from catalog.api.deps import SessionDep
from catalog.read.errors import ReadError
from catalog.store.models import Annotator

COOKIE = "nc_token"


class CsrfFailed(ReadError):
    status = 403


def csrf_for(token: str) -> str:
    """A per-sign-in CSRF token: an HMAC of the stored token hash (nothing more to store)."""
    return hmac.new(service.hash_token(token).encode(), b"neuron-catalog csrf", hashlib.sha256).hexdigest()


def resolve(request: Request, session: Session) -> Annotator | None:
    """Set ``request.state.user`` / ``csrf_token`` from the cookie; the annotator or None."""
    token = request.cookies.get(COOKIE)
    user = service.authenticate(session, token) if token else None
    request.state.user = user
    request.state.csrf_token = csrf_for(token) if user is not None and token else ""
    return user


def page_user(request: Request, session: SessionDep) -> Annotator | None:
    """Dependency of every UI page: who is signed in (None for readers)."""
    return resolve(request, session)


def check_csrf(request: Request, sent: str | None) -> None:
    token = request.cookies.get(COOKIE)
    if not token or not sent or not hmac.compare_digest(csrf_for(token), sent):
        raise CsrfFailed("the form's CSRF token is missing or wrong: reload the page and try again")


PageUser = Annotated[Annotator | None, Depends(page_user)]
