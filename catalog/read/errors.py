"""Errors of the read side, each with the HTTP status the API answers it with."""

from __future__ import annotations


class ReadError(Exception):
    """A request the catalog cannot answer; the message is one line, fit to show a user."""

    status = 400


class NotFound(ReadError):
    status = 404


class InvalidParameter(ReadError):
    status = 422


class Unsupported(ReadError):
    """The catalog exists but lacks what the request needs (e.g. extracted before a feature)."""

    status = 409


class CatalogMissing(ReadError):
    """The database has no catalog schema yet (a new data directory)."""

    status = 503


class Conflict(ReadError):
    """A write based on an outdated revision, or a first annotation where one exists."""

    status = 409


class Forbidden(ReadError):
    """Someone else's annotation."""

    status = 403


class Unauthorized(ReadError):
    """No annotator token, or one that is unknown or revoked."""

    status = 401
