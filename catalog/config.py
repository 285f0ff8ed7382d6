"""The one settings object; every knob is read from ``CATALOG_*`` environment variables once."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CATALOG_", extra="ignore")

    # Any Postgres with pgvector. Unset: an embedded Postgres runs from ``data_dir``.
    database_url: str | None = None
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("neuron-catalog")))
    broker_url: str = "redis://localhost:6379/0"
    # "auto" picks CUDA when present.
    device: str = "auto"

    # suggested_label rule (README, "Suggested labels"): drops are mean relative decreases of the
    # memory coefficient over the top triggers when a token is removed.
    shallow_last_drop: float = 0.5
    semantic_other_drop: float = 0.25

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def embedded_pgdata(self) -> Path:
        return self.data_dir / "pgdata"


settings = Settings()
