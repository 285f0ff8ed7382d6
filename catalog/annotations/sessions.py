"""Server-side sessions of the review UI (issue 15; README, "Design notes").

The browser's cookie carries only a random session id (``secrets.token_urlsafe(32)``); the table
``ui_sessions`` keeps its SHA-256, the annotator, a random CSRF token for that session's forms, and
when it was made, last used, ends at the latest, and was revoked. A session is valid while it is not
revoked, was used within ``settings.session_idle_hours``, is younger than ``settings.session_max_days``
and its annotator still holds a token (``users revoke`` also revokes every session of theirs).
Like the rest of catalog.annotations, nothing here commits: the caller's session does.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.store.models import Annotator, UiSession

# last_seen_at is written at most this often per session (a page view is a read; this keeps it one).
TOUCH_EVERY = timedelta(seconds=60)
MAX_ID = 200  # longer cookie values are not ours


@dataclass(frozen=True)
class Active:
    """A valid session: its row id, annotator, CSRF token and when it was last seen."""

    id: int
    annotator: Annotator
    csrf_token: str
    last_seen_at: datetime


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start(session: Session, annotator: Annotator, *, replacing: str | None = None) -> tuple[str, str]:
    """A new session of ``annotator``: (session id for the cookie, its CSRF token). ``replacing`` is the
    browser's previous session id, if any: it is revoked (a sign-in always rotates the session)."""
    now = datetime.now(UTC)
    if replacing:
        revoke(session, replacing)
    # Sessions past their absolute end are no use to anyone: dropped here rather than by a sweeper.
    session.execute(delete(UiSession).where(UiSession.annotator_id == annotator.id, UiSession.expires_at < now))
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(UiSession(id_sha256=_hash(session_id), annotator_id=annotator.id, csrf_token=csrf,
                          created_at=now, last_seen_at=now,
                          expires_at=now + timedelta(days=settings.session_max_days)))
    session.flush()
    return session_id, csrf


def lookup(session: Session, session_id: str | None) -> Active | None:
    """The valid session with this id, or None (unknown, revoked, idle too long, too old, or its
    annotator revoked)."""
    if not session_id or len(session_id) > MAX_ID:
        return None
    now = datetime.now(UTC)
    row = session.execute(
        select(UiSession, Annotator).join(Annotator, Annotator.id == UiSession.annotator_id)
        .where(UiSession.id_sha256 == _hash(session_id), UiSession.revoked_at.is_(None),
               UiSession.expires_at > now,
               UiSession.last_seen_at > now - timedelta(hours=settings.session_idle_hours),
               Annotator.token_sha256.is_not(None))
    ).tuples().first()
    if row is None:
        return None
    ui, who = row
    return Active(id=ui.id, annotator=who, csrf_token=ui.csrf_token, last_seen_at=ui.last_seen_at)


def touch(session: Session, active: Active) -> bool:
    """Record that the session was used now (the idle limit counts from here); True when written."""
    now = datetime.now(UTC)
    if now - active.last_seen_at < TOUCH_EVERY:
        return False
    session.execute(update(UiSession).where(UiSession.id == active.id, UiSession.revoked_at.is_(None))
                    .values(last_seen_at=now))
    return True


def revoke(session: Session, session_id: str) -> None:
    """Revoke one session by its id (a sign-in rotating the browser's session)."""
    if session_id and len(session_id) <= MAX_ID:
        session.execute(update(UiSession).where(UiSession.id_sha256 == _hash(session_id),
                                                UiSession.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC)))


def end(session: Session, session_id: str) -> None:
    """Sign-out: the session's row is deleted."""
    if session_id and len(session_id) <= MAX_ID:
        session.execute(delete(UiSession).where(UiSession.id_sha256 == _hash(session_id)))


def end_all(session: Session, annotator_id: int) -> int:
    """Revoke every session of an annotator (their token was revoked); how many were live."""
    result = session.execute(
        update(UiSession).where(UiSession.annotator_id == annotator_id, UiSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
