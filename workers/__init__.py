"""Celery workers: thin task shells around ``catalog.service`` (part 3 adds distributed extraction)."""
