"""The one settings object; every knob is read from ``CATALOG_*`` environment variables once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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

    # Distributed extraction (part 7; catalog/requests.py, workers/). Redis re-delivers a message
    # still unacknowledged after this long, even while its worker is alive: a duplicate is harmless
    # (the request's lock makes it a no-op), but a SIGKILLed worker's message only comes back this
    # late, which is why each worker also runs a sweeper.
    visibility_timeout_s: int = Field(default=24 * 3600, ge=1)
    # How often each worker's sweeper looks for running requests whose holder died (its advisory
    # lock is free) and re-sends them; a re-sent request is re-sent again only after
    # visibility_timeout_s if still nobody takes it.
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # A request started this many times without finishing (its worker died each time, e.g. out of
    # memory) is marked failed instead of being started again.
    request_max_attempts: int = Field(default=3, ge=1)
    # Runs made of shards (part 8). A pass shard covers about this many corpus tokens (whole
    # documents); ablation shards about a fifth as many trigger prefixes (each costs a few forward
    # tokens). A shard's holder renews its lease every third of ``shard_lease_s``; a holder whose lease
    # ran out is taken over, and its late write refused. A shard failing this many attempts fails its run.
    shard_tokens: int = Field(default=100_000, ge=1)
    shard_lease_s: float = Field(default=60.0, gt=0)
    shard_max_attempts: int = Field(default=3, ge=1)
    # TCP keepalives of a worker's database connections, both ends (libpq and the server's
    # tcp_keepalives_*): a worker machine that vanishes without closing its sockets (power loss,
    # network cut) has its sessions, and so its locks, dropped after about idle + interval x count
    # seconds, so that its request can be taken over.
    keepalives_idle_s: int = Field(default=10, ge=1)
    keepalives_interval_s: int = Field(default=5, ge=1)
    keepalives_count: int = Field(default=3, ge=1)
    # "auto" picks CUDA when present.
    device: str = "auto"
    # Memory (MiB, on the model's device) the corpus pass may spend on keeping each window's start
    # (keys and values of its tokens before the first random removal index) for the random ablation
    # run in the same process (catalog/extract/ablation.py, StartCache): about half the corpus's
    # tokens at 46 KB each for SmolLM2 in float32. Windows past it run their starts again; 0: none kept.
    ablation_start_cache_mb: int = Field(default=4096, ge=0)

    # suggested_label rule (README, "Suggested labels"; catalog/extract/labels.py): triggers with
    # prefixes shorter than this are left out, and the thresholds are this quantile of the neurons'
    # contrast and context medians pooled over the whole model.
    label_min_prefix: int = Field(default=4, ge=2)
    label_min_triggers: int = Field(default=5, ge=1)
    label_quantile: float = Field(default=0.5, gt=0, lt=1)

    # Token ranking with order=rank (README, "Token ranking orders"): ranks up to the stored top tokens
    # come from value_tokens; beyond them every neuron in range is ranked over the whole vocabulary
    # when (neurons x vocabulary) is at most this, and otherwise this many candidates (nearest values
    # by cosine, at least 2x the neurons still wanted) are.
    rank_exact_max_logits: int = 20_000_000
    # Exact neighbour lists (part 10): each run stores per neuron and space (similar neurons) and per
    # token, order and convention (token ranking) the first this-many of the exact order
    # (catalog/extract/neighbours.py); a request a list cannot answer (k beyond it, or a layer range
    # holding fewer than k of it) scores every vector in range instead.
    neighbour_list_size: int = Field(default=50, ge=1, le=500)
    rank_candidates: int = 200
    # A search query running longer than this is cancelled (503) rather than holding a connection.
    statement_timeout_ms: int = 10_000
    # Longest text POST /probe accepts, in tokens (the run's window caps it too).
    probe_max_tokens: int = 256

    # Bounded pattern search (part 6; README "Design notes"). A q that the neurons' lexeme sets do
    # not decide alone (several words, a phrase, an exclusion) is checked per prefix, on at most
    # this many prefixes (found through the prefixes' GIN index) ...
    pattern_prefixes_max: int = Field(default=5_000, ge=1)
    # ... or, when more prefixes match, on at most this many candidate neurons (each up to top_n
    # prefixes); beyond both, q is refused (422: too broad). sort=relevance needs the same bound.
    pattern_candidates_max: int = Field(default=2_000, ge=1)
    # A search page's total is counted exactly up to this many neurons, estimated above.
    search_total_max: int = Field(default=10_000, ge=0)
    # Expensive requests (pattern search, token ranking, similar, probe) running at once per server
    # process; keep it below the API engine's connection pool (5 + 10 overflow), so /healthz and
    # cheap requests always find a connection. One more waits up to expensive_wait_s, then 429.
    expensive_concurrency: int = Field(default=4, ge=1)
    expensive_wait_s: float = Field(default=2.0, ge=0)
    # Per client IP, a token bucket over every request but /healthz and /static: this many requests
    # a second on average, bursts of rate_limit_burst; beyond, 429 with Retry-After. 0 turns it off.
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=1_000, ge=1)

    # Review UI sign-in (README, "Design notes"). Origins, besides the request's own, that may send
    # POST/PUT/PATCH/DELETE: comma-separated scheme://host[:port] (e.g. the public URL when a proxy
    # rewrites Host). The session cookie's Secure flag: auto = when the request is https (as uvicorn
    # sees it, X-Forwarded-Proto from its trusted proxies included), or forced true / false.
    trusted_origins: str = ""
    cookie_secure: Literal["auto", "true", "false"] = "auto"
    # A UI session ends after this long without a request, and at the latest this long after sign-in.
    session_idle_hours: float = Field(default=12, gt=0)
    session_max_days: float = Field(default=7, gt=0)

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def embedded_pgdata(self) -> Path:
        return self.data_dir / "pgdata"


settings = Settings()
