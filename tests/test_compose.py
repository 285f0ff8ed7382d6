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
    assert _command(services["worker"])[:2] == ["neuron-catalog", "worker"]
    assert _command(services["migrate"])[-2:] == ["db", "upgrade"]
    # Every image builds here from a Debian base named by a build argument (no registry needed).
    for name in ("db", "redis", "api", "worker", "migrate"):
        assert "BASE" in services[name]["build"]["args"], name
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    # Only the API port is published; every long-running service has a health check.
    assert [n for n, s in services.items() if s.get("ports") and not s.get("profiles")] == ["api"]
    for name in ("db", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name


def test_api_service(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    cmd = _command(api)
    assert cmd[:2] == ["neuron-catalog", "serve"], cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000", cmd
    assert (8000, 8000) in _published(api), api.get("ports")
    deps = api["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["db"]["condition"] == "service_healthy"
    test = api["healthcheck"]["test"]
    assert "/healthz" in " ".join(test if isinstance(test, list) else [test])


def test_no_credentials_in_the_file() -> None:
    """Passwords come from the environment or .env, never from docker-compose.yml itself."""
    text = COMPOSE_FILE.read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-}" in text
    assert "catalog:catalog@" not in text and "PASSWORD: catalog" not in text


@pytest.fixture(scope="module")
def gpu_config() -> dict[str, Any]:
    if COMPOSE is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    p = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config"], cwd=REPO,
                       capture_output=True, text=True, env={**env, **NO_ENGINE}, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    return yaml.safe_load(p.stdout)


def test_gpu_worker_profile(config: dict[str, Any], gpu_config: dict[str, Any]) -> None:
    """The GPU worker is only in the gpu profile (a plain `up` works without a GPU) and reserves one through the NVIDIA runtime."""
    assert config["services"].get("worker-gpu", {}).get("profiles", ["gpu"]) == ["gpu"]
    gpu = gpu_config["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # PyPI's CUDA build
    assert gpu["environment"]["CATALOG_DEVICE"] == "cuda"
