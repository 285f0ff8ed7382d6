"""Test helpers with no torch in sight: the installed `neuron-catalog` command run as a user runs it,
and a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CLI = str(Path(sys.executable).with_name("neuron-catalog"))
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    """Run the installed command; the session database comes through CATALOG_DATABASE_URL in os.environ."""
    full_env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        # wide, plain help output so that option names are not wrapped or coloured
        "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **(env or {}),
    }
    p = subprocess.run([CLI, *args], check=False, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
