"""Celery workers: thin task shells around ``catalog.runs`` (part 3 adds distributed extraction)."""
