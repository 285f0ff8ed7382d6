"""The embedded Postgres (no CATALOG_DATABASE_URL): started by the command itself, settings applied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_runner import REPO, cli


def test_embedded_server_takes_shared_buffers_from_settings(tmp_path: Path) -> None:
    env = {"CATALOG_DATA_DIR": str(tmp_path), "CATALOG_EMBEDDED_SHARED_BUFFERS": "48MB", "CATALOG_DATABASE_URL": ""}
    base = {k: v for k, v in os.environ.items() if k != "CATALOG_DATABASE_URL"}
    first = cli("db", "upgrade", env={**env})  # a new data directory: created, schema applied, stopped at exit
    assert first.returncode == 0, first.stderr
    show = "from sqlalchemy import text; from catalog.store.database import get_engine; " \
           "c = get_engine().connect(); print(c.scalar(text('SHOW shared_buffers')))"
    out = subprocess.run([sys.executable, "-c", show], cwd=REPO, env={**base, **env}, capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "48MB"
    assert "shared_buffers = '48MB'" in (tmp_path / "pgdata" / "postgresql.auto.conf").read_text()
