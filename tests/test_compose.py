"""docker-compose.yml is valid for the Compose that is installed (`docker compose` v2 or Debian's
`docker-compose` 1.29, which scripts/setup.sh installs) and wires up the whole stack.

`config` only parses, validates and resolves the file: no Docker engine is needed, and the test
points DOCKER_HOST at a socket that does not exist to prove it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _compose_command() -> list[str] | None:
    """`docker compose` when the v2 plugin works, else `docker-compose`, else None."""
    env = {**os.environ, **NO_ENGINE}
    if shutil.which("docker"):
        p = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, env=env, check=False)
        if p.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        p = subprocess.run(["docker-compose", "version"], capture_output=True, text=True, env=env, check=False)
        if p.returncode == 0:
            return ["docker-compose"]
    return None


COMPOSE = _compose_command()


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    if COMPOSE is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/setup.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    p = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "config"], cwd=REPO, capture_output=True, text=True,
                       env={**env, **NO_ENGINE}, timeout=120, check=False)
    assert p.returncode == 0, f"{' '.join(COMPOSE)} config failed:\n{p.stderr}"
    parsed = yaml.safe_load(p.stdout)
    assert isinstance(parsed, dict) and "services" in parsed, p.stdout + p.stderr
    return parsed


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else [str(x) for x in cmd or []]


def _published(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, target) pairs from short ("8000:8000") or long ({published, target}) syntax."""
    out = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.add((int(port["published"]), int(port["target"])))
        else:
            host, _, target = str(port).rpartition(":")
            out.add((int(host.rpartition(":")[2]), int(target.split("/")[0])))
    return out


def test_services(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"api", "worker", "db", "redis", "migrate"} <= set(services), sorted(services)
    assert services["db"]["image"].startswith("pgvector/pgvector")
    assert "celery" in _command(services["worker"])
    assert _command(services["migrate"])[-2:] == ["db", "upgrade"]


def test_api_service(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    cmd = _command(api)
    assert cmd[:2] == ["neuron-catalog", "serve"], cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000", cmd
    assert (8000, 8000) in _published(api), api.get("ports")
    # the same image as the worker, on the same database
    worker = config["services"]["worker"]
    assert api["image"] == worker["image"]
    assert api["environment"]["CATALOG_DATABASE_URL"] == worker["environment"]["CATALOG_DATABASE_URL"]
    assert "@db:" in api["environment"]["CATALOG_DATABASE_URL"]
    deps = api["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["db"]["condition"] == "service_healthy"
    test = api["healthcheck"]["test"]
    assert "http://localhost:8000/healthz" in " ".join(test if isinstance(test, list) else [test])
