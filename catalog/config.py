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
    # shared_buffers of the embedded Postgres (e.g. "2GB"); unset: Postgres' default (128MB), which
    # cannot hold a GPT-2-XL-sized HNSW index (1.2 GB). Applied when the embedded server starts.
    embedded_shared_buffers: str | None = Field(default=None, pattern=r"^\d+(kB|MB|GB)$")
    broker_url: str = "redis://localhost:6379/0"
    # "auto" picks CUDA when present.
    device: str = "auto"

    # suggested_label rule (README, "Suggested labels"; catalog/extract/labels.py): triggers with
    # prefixes shorter than this are left out, and the thresholds are this quantile of the neurons'
    # contrast and context medians pooled over the whole model.
    label_min_prefix: int = Field(default=4, ge=2)
    label_min_triggers: int = Field(default=5, ge=1)
    label_quantile: float = Field(default=0.5, gt=0, lt=1)

    # Search API (part 3). Token ranking and similar neurons score every vector exactly when the
    # layers asked for hold at most this many neurons, and go through the HNSW index otherwise.
    exact_vector_scan_max: int = 20_000
    # HNSW candidates examined per query (pgvector's hnsw.ef_search, at most 1000; at least 2k is
    # used): similar neurons (cosine) and token ranking (inner product, the harder index: recall@50
    # 0.91 at 400, 0.948 at 800, 0.960 at 1000 on the GPT-2-XL-sized benchmark, docs/benchmarks.md).
    hnsw_ef_search: int = 400
    hnsw_ef_search_ranking: int = 1000
    # A search query running longer than this is cancelled (503) rather than holding a connection.
    statement_timeout_ms: int = 10_000
    # Longest text POST /probe accepts, in tokens (the run's window caps it too).
    probe_max_tokens: int = 256

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def embedded_pgdata(self) -> Path:
        return self.data_dir / "pgdata"


settings = Settings()
