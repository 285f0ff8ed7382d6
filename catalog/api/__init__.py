"""The HTTP API (FastAPI): thin routes over catalog.read; ``probe`` is the one route that needs a model."""
