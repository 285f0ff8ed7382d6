"""The compose stack, run for real: what a user does, from the host, against a real Docker engine.

`scripts/compose.sh` prepares the machine (engine, dockerd, base images, wheelhouse) and runs
compose; the test only talks to the stack the way a user would: through compose commands, the
published API port, `docker kill`, and psql inside the db container. Steps (issue 16):
1. build, `up -d --scale worker=2`, every service healthy;
2. a tiny seeded model extracted through the workers (`extract --distributed --shard-tokens`, in a
   container: several pass shards) is served on the published port, and its export equals an
   in-process extraction on the host with the same options;
3. an annotator made by the CLI in a container signs in to the UI and saves an annotation;
4. the same extraction sharded over both worker containers (both caught mid-shard at once), one of
   them `docker kill`ed in the middle of a shard: the survivor re-runs that shard (attempt 2, every
   other shard one attempt), the run is published once with the old catalog served until then, and
   its export equals the in-process one;
5. the database stopped and started, `restart`ed, and the stack `down` and `up` without -v: 503
   with a clear message while it is down, recovery by itself, catalog and annotation kept;
6. a worker against a schema newer than its code refuses in one line, non-zero;
7. `down -v` leaves no container, network or volume of the project.

Run alone with `pytest -m compose`. It skips only when no Docker engine can be started.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tiny_models

from catalog.runs.lifecycle import WAITING_TO_WRITE, WRITE_LOCK_CLASS
from catalog.store.migrate import head

REPO = Path(__file__).resolve().parents[1]
COMPOSE_SH = REPO / "scripts" / "compose.sh"
# Upper bounds for a stuck stack, never assertions about speed.
HEALTHY_LIMIT_S = 300.0
RUN_LIMIT_S = 300.0
# Corpus tokens per pass shard: the tiny model's corpus (about 2,800 tokens) makes 5 or more shards.
SHARD_TOKENS = 500
SERVICES = ("db", "redis", "api", "worker")

pytestmark = pytest.mark.compose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: its own name, password and API port; every command logged."""

    def __init__(self, log: Path) -> None:
        self.project = f"nctest{os.getpid()}"
        self.password = secrets.token_urlsafe(12)
        self.port = _free_port()
        self.log = log
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "CATALOG_", "NC_"))},
            "POSTGRES_PASSWORD": self.password,
            "NC_API_PORT": str(self.port),
            # A dead worker's run is found and re-queued within seconds (default 30 s).
            "CATALOG_SWEEP_INTERVAL_S": "2",
            # The catalogs are compared with the in-process one bit for bit: no window starts kept
            # (ablation.StartCache; tests/test_shards.py's exact_placement).
            "CATALOG_ABLATION_START_CACHE_MB": "0",
        }
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        t = time.monotonic()
        p = subprocess.run(["bash", str(COMPOSE_SH), "-p", self.project, *args], cwd=REPO, env=self.env,
                           capture_output=True, text=True, timeout=timeout, check=False)
        with self.log.open("a") as f:
            f.write(f"$ compose {' '.join(args)}  # rc {p.returncode}, {time.monotonic() - t:.1f}s\n"
                    f"{p.stdout[-4000:]}{p.stderr[-4000:]}\n")
        if check:
            assert p.returncode == 0, f"compose {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}"
        return p

    def psql(self, sql: str, database: str = "catalog") -> str:
        """One statement through psql in the db container (`docker exec`: quicker than compose's)."""
        p = subprocess.run(["docker", "exec", self.db_container(), "psql", "-U", "catalog", "-d", database,
                            "-v", "ON_ERROR_STOP=1", "-Atc", sql], capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, f"psql {sql!r}: {p.stderr}"
        return p.stdout.strip()

    def db_container(self) -> str:
        running = [c["Id"] for c in self.containers("db") if c["State"]["Running"]]
        assert running, "the db container is not running"
        return running[0]

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        labels = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            labels += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = subprocess.run(["docker", "ps", "-aq", *labels], capture_output=True, text=True, check=True).stdout.split()
        if not ids:
            return []
        out = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    def wait_healthy(self, workers: int) -> dict[str, float]:
        """Until db, redis, api and `workers` workers report healthy; seconds to each."""
        t0, seen = time.monotonic(), {}
        while True:
            states: dict[str, list[str]] = {s: [] for s in SERVICES}
            for c in self.containers():
                service = c["Config"]["Labels"]["com.docker.compose.service"]
                if service in states and c["State"]["Running"]:
                    states[service].append((c["State"].get("Health") or {}).get("Status", "none"))
            for s, health in states.items():
                want = workers if s == "worker" else 1
                if s not in seen and health.count("healthy") >= want:
                    seen[s] = time.monotonic() - t0
            if len(seen) == len(SERVICES):
                return seen
            if time.monotonic() - t0 > HEALTHY_LIMIT_S:
                logs = self.compose("logs", "--tail", "30", check=False).stdout
                pytest.fail(f"not healthy after {HEALTHY_LIMIT_S:.0f}s: {states}\n{logs[-4000:]}")
            time.sleep(1)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.api.get(path, **kw)

    def current_run(self, model: str) -> int | None:
        for m in self.get("/api/v1/models").json()["items"]:
            if m["name"] == model:
                return m["current_run"]["id"] if m["current_run"] else None
        return None

    def shards(self, run_id: int) -> list[Shard]:
        rows = self.psql("SELECT kind, index, status, attempts, coalesce(holder, '') FROM run_shards "
                         f"WHERE run_id = {int(run_id)} ORDER BY kind DESC, index")
        return [Shard(k, int(i), st, int(a), h.split(":")[0])
                for k, i, st, a, h in (line.split("|") for line in rows.splitlines() if line)]

    def export(self, model: str) -> list[dict[str, Any]]:
        """The catalog's export, made by the CLI in a worker container (run_id cleared: it differs
        between two databases, and is the only per-run field of an export)."""
        out = self.compose("run", "--rm", "--no-deps", "-T", "worker", "sh", "-c",
                           f"neuron-catalog export --model {model} --out /tmp/e.jsonl >&2 && cat /tmp/e.jsonl")
        return [{**json.loads(line), "run_id": None} for line in out.stdout.splitlines() if line.strip()]

    def request_row(self, request_id: str) -> tuple[str, str, int, str]:
        """(status, holder, attempts, the run's stage) of an extraction request."""
        row = self.psql("SELECT q.status, coalesce(q.holder, ''), q.attempts, coalesce(r.progress->>'stage', '') "
                        "FROM extraction_requests q LEFT JOIN extraction_runs r ON r.id = q.run_id "
                        f"WHERE q.id = {int(request_id)}")
        status, holder, attempts, stage = row.split("|")
        return status, holder, int(attempts), stage


@dataclass(frozen=True)
class Shard:
    """A run_shards row as the test sees it; host: its holder's hostname (a container's)."""

    kind: str
    index: int
    status: str
    attempts: int
    host: str


class Psql:
    """A long-lived psql session in the db container, fed statements from the test (for locks that
    must outlive one statement)."""

    def __init__(self, stack: Stack) -> None:
        self.proc = subprocess.Popen(["docker", "exec", "-i", stack.db_container(), "psql", "-U", "catalog", "-d",
                                      "catalog", "-Atq", "-v", "ON_ERROR_STOP=1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self._n = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def run(self, *statements: str, timeout: float = 60) -> None:
        """Send ``statements`` and wait until psql has run them all."""
        assert self.proc.stdin is not None
        self._n += 1
        marker = f"done-{self._n}"
        self.proc.stdin.write("\n".join([*statements, f"SELECT '{marker}';"]) + "\n")
        self.proc.stdin.flush()
        with self._cond:
            ok = self._cond.wait_for(lambda: marker in self.lines or "<eof>" in self.lines, timeout)
            assert ok and marker in self.lines, f"psql {statements}: {self.lines}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\\q\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _engine_or_skip(stack: Stack) -> None:
    p = stack.compose("version", check=False, timeout=900)
    if p.returncode != 0:
        pytest.skip(f"no Docker engine could be started here: {p.stderr.strip().splitlines()[-1:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log = tmp_path_factory.mktemp("compose") / "compose.log"
    s = Stack(log)
    _engine_or_skip(s)
    try:
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", check=False)
        s.api.close()
        print(f"\ncompose log: {log}", file=sys.stderr)


def _differences(got: list[dict[str, Any]], want: list[dict[str, Any]], most: int = 5) -> list[str]:
    """The first few (layer, neuron, field) that differ, with both values: what a failure needs to say."""
    out = []
    for g, w in zip(got, want, strict=False):
        for key in sorted(set(g) | set(w)):
            if g.get(key) != w.get(key):
                out.append(f"{g.get('layer')}/{g.get('neuron')} {key}: {str(g.get(key))[:200]} != {str(w.get(key))[:200]}")
                if len(out) >= most:
                    return out
    return out


def _host_export(tmp: Path, model: Path, corpus: Path) -> list[dict[str, Any]]:
    """The same extraction in a host process, on the test's own Postgres (the reference)."""
    nc = Path(sys.executable).with_name("neuron-catalog")
    subprocess.run([str(nc), "extract", "--model", str(model), "--name", "tiny", "--corpus", str(corpus),
                    "--shard-tokens", str(SHARD_TOKENS)],
                   check=True, capture_output=True, text=True, timeout=RUN_LIMIT_S,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "CATALOG_ABLATION_START_CACHE_MB": "0"})
    out = tmp / "host.jsonl"
    subprocess.run([str(nc), "export", "--model", "tiny", "--out", str(out)], check=True, capture_output=True, timeout=120)
    return [{**json.loads(line), "run_id": None} for line in out.read_text().splitlines()]


def _corpus(path: Path, documents: int, seed: int) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and", "old", "towns", "kept", "their", "bells", "ringing", "at", "noon", "for", "every", "person", "who", "walked", "past", "the", "river", "to", "the", "market", "square"]
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(documents)) + "\n")
    return path


def test_compose_stack(stack: Stack, migrated_db: str, tmp_path: Path) -> None:
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    # 1. Build and start: two workers, every service healthy.
    t = time.monotonic()
    stack.compose("build", "db", "redis", "api", "worker")
    timings["build"] = time.monotonic() - t
    t = time.monotonic()
    stack.compose("up", "-d", "--scale", "worker=2")
    healthy = stack.wait_healthy(workers=2)
    timings["up_to_healthy"] = time.monotonic() - t
    migrate = stack.containers("migrate")
    assert migrate and migrate[0]["State"]["ExitCode"] == 0, "the one-shot migration did not succeed"
    for c in stack.containers():
        assert c["Config"]["User"] not in ("", "root", "0"), f"{c['Name']} runs as root"
    published = {c["Config"]["Labels"]["com.docker.compose.service"]
                 for c in stack.containers() if any(c["NetworkSettings"]["Ports"].get(p) for p in c["NetworkSettings"]["Ports"])}
    assert published == {"api"}, f"only the API port is published by default, not {published}"
    assert stack.get("/healthz").json() == {"status": "ok"}
    # The API image has no torch: probe says so instead of failing.
    api_torch = stack.compose("exec", "-T", "api", "python3", "-c",
                              "import importlib.util; print(importlib.util.find_spec('torch') is None)")
    assert api_torch.stdout.strip() == "True"

    # 2. A tiny seeded model through the workers; its export equals an in-process extraction.
    inputs = tmp_path / "inputs"
    tiny_models.save("gpt2", inputs / "tiny", seed=3)
    _corpus(inputs / "corpus.txt", 120, seed=1)
    subprocess.run(["chmod", "-R", "a+rX", str(inputs)], check=True)
    stack.compose("run", "--rm", "--no-deps", "-v", f"{inputs}:/in:ro", "worker",
                  "sh", "-c", "mkdir -p /data/inputs && cp -r /in/. /data/inputs/")
    t = time.monotonic()
    run = stack.compose("run", "--rm", "--no-deps", "worker", "neuron-catalog", "extract", "--distributed",
                        "--model", "/data/inputs/tiny", "--name", "tiny", "--corpus", "/data/inputs/corpus.txt",
                        "--shard-tokens", str(SHARD_TOKENS), timeout=RUN_LIMIT_S)
    timings["extract_through_worker"] = time.monotonic() - t
    assert "catalog 'tiny'" in run.stdout, run.stdout + run.stderr
    first_run = stack.current_run("tiny")
    assert first_run is not None
    page = stack.get("/api/v1/models/tiny/neurons", params={"layer": 0, "limit": 5})
    assert page.status_code == 200 and page.json()["items"], page.text
    n_pass = [s for s in stack.shards(first_run) if s.kind == "pass"]
    assert len(n_pass) >= 4 and all(s.status == "done" for s in n_pass), n_pass
    in_stack = stack.export("tiny")
    t = time.monotonic()
    on_host = _host_export(tmp_path, inputs / "tiny", inputs / "corpus.txt")
    timings["extract_in_host_process"] = time.monotonic() - t
    assert len(in_stack) == len(on_host) > 0
    assert in_stack == on_host, f"the stack's catalog differs from the in-process extraction: {_differences(in_stack, on_host)}"

    # 3. An annotator from the CLI in a container; UI sign-in with the token; an annotation saved.
    token = stack.compose("run", "--rm", "--no-deps", "-T", "api", "neuron-catalog", "users", "add", "alice").stdout.strip()
    assert token, "users add printed no token"
    origin = f"http://127.0.0.1:{stack.port}"
    with httpx.Client(base_url=origin, timeout=30) as ui:
        signed = ui.post("/signin", data={"token": token, "next": "/"}, headers={"Origin": origin})
        assert signed.status_code == 303, signed.text
        assert "alice" in ui.get("/").text
    saved = stack.api.put("/api/v1/models/tiny/neurons/0/1/annotations/alice",
                          json={"label": "shallow", "description": "ends with 'the'"},
                          headers={"Authorization": f"Bearer {token}", "Origin": origin})
    assert saved.status_code == 201, saved.text

    # 4. A sharded run over both workers; one is `docker kill`ed in the middle of a shard: the survivor
    # re-runs that shard (attempt 2), the run is published once, equal to the in-process catalog, with
    # the old catalog served until then. A psql session holds shard_states in SHARE mode, so every
    # shard that has computed its state waits inside lifecycle.complete (its row updated, its state
    # not written, its liveness lock held): both workers are caught mid-shard at once, by construction.
    # The session also holds the extractions' write lock (lifecycle.WRITE_LOCK_CLASS), so the run's
    # finish step then waits just before publishing, at a known point, with every shard done.
    workers = {c["Config"]["Hostname"]: c["Id"] for c in stack.containers("worker")
               if c["State"]["Running"] and c["Config"]["Labels"].get("com.docker.compose.oneoff") != "True"}
    assert len(workers) == 2, f"two worker containers, not {sorted(workers)}"
    t = time.monotonic()
    blocker = Psql(stack)
    blocker.run(f"SELECT pg_advisory_lock({WRITE_LOCK_CLASS}, 0);", "BEGIN;", "LOCK TABLE shard_states IN SHARE MODE;")
    queued = stack.compose("run", "--rm", "--no-deps", "-T", "worker", "neuron-catalog", "extract", "--distributed",
                           "--no-wait", "--model", "/data/inputs/tiny", "--name", "tiny",
                           "--corpus", "/data/inputs/corpus.txt", "--shard-tokens", str(SHARD_TOKENS))
    request_id = queued.stdout.strip().splitlines()[-1].strip()
    run_id = _wait_run_id(stack, request_id)

    def both_mid_shard() -> list[Shard] | None:
        waiting = int(stack.psql("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'shard_states'::regclass"))
        running = [s for s in stack.shards(run_id) if s.kind == "pass" and s.status == "running"]
        return running if waiting == 2 and len(running) == 2 and len({s.host for s in running}) == 2 else None

    running = _wait_for(stack, both_mid_shard, "both workers waiting mid-shard")
    shards = stack.shards(run_id)
    assert len([s for s in shards if s.kind == "pass"]) >= 4, f"too few pass shards: {shards}"
    assert not [s for s in shards if s.status == "done"], f"no shard can finish while shard_states is locked: {shards}"
    assert {s.host for s in running} == set(workers), f"holders {running} are not the two workers {sorted(workers)}"
    assert all(s.attempts == 1 for s in running)
    killed = running[0]
    timings["sharded_run_to_both_mid_shard"] = time.monotonic() - t
    t = time.monotonic()
    subprocess.run(["docker", "kill", workers[killed.host]], check=True, capture_output=True)
    _wait_for(stack, lambda: not any(c["State"]["Running"] for c in stack.containers("worker")
                                     if c["Id"] == workers[killed.host]), "the killed worker to stop")
    assert stack.current_run("tiny") == first_run, "the old catalog must stay current until the new one is published"
    blocker.run("ROLLBACK;")  # the table lock goes; the write lock (session level) stays
    # The survivor finishes its shard and the rest; its sweeper finds the killed shard `running` with
    # its lock free and sends it again; the run merges, ablates, and waits to write.
    _wait_request(stack, request_id, lambda st, h, a, sg: sg == WAITING_TO_WRITE)
    timings["kill_to_waiting_to_write"] = time.monotonic() - t
    survivor = next(h for h in workers if h != killed.host)
    shards = stack.shards(run_id)
    assert all(s.status == "done" for s in shards), shards
    again = [s for s in shards if (s.kind, s.index) == (killed.kind, killed.index)]
    assert [(s.attempts, s.host) for s in again] == [(2, survivor)], f"the killed shard, re-run: {again}"
    assert all(s.attempts == 1 for s in shards if s not in again), f"only the killed shard runs twice: {shards}"
    assert stack.current_run("tiny") == first_run, "the old catalog must stay current until the new one is published"
    blocker.run("SELECT pg_advisory_unlock_all();")
    blocker.close()
    status, _, attempts, _ = _wait_request(stack, request_id, lambda st, h, a, sg: st not in ("queued", "running"))
    assert status == "published", stack.psql(f"SELECT error FROM extraction_requests WHERE id = {int(request_id)}")
    assert attempts == 1, f"the request was planned {attempts} times, not once"
    second_run = stack.current_run("tiny")
    assert second_run == run_id and second_run != first_run
    complete = stack.psql("SELECT count(*) FROM extraction_runs r JOIN catalog_models m ON m.id = r.model_id "
                          "WHERE m.name = 'tiny' AND r.status = 'complete'")
    assert complete == "1", f"{complete} complete runs of 'tiny'"
    again_stack = stack.export("tiny")
    assert again_stack == on_host, ("the catalog of the run with a killed worker differs from the in-process one: "
                                    f"{_differences(again_stack, on_host)}")
    neurons = stack.get("/api/v1/models/tiny/neurons", params={"layer": 0, "limit": 1}).json()["total"]

    # 5. The database goes away and comes back; the stack is taken down and up without -v.
    stack.compose("stop", "db")
    down = stack.get("/api/v1/models/tiny/neurons", params={"layer": 0})
    assert down.status_code == 503, down.text
    assert down.headers["content-type"].startswith("application/json") and "unavailable" in down.json()["detail"]
    assert "Traceback" not in down.text
    assert stack.get("/healthz").status_code == 503
    stack.compose("start", "db")
    _wait_api(stack, "/api/v1/models/tiny/neurons?layer=0")
    stack.compose("restart", "db")
    _wait_api(stack, "/api/v1/models/tiny/neurons?layer=0")
    stack.compose("down")
    t = time.monotonic()
    stack.compose("up", "-d", "--scale", "worker=2")
    stack.wait_healthy(workers=2)
    timings["up_again_to_healthy"] = time.monotonic() - t
    assert stack.current_run("tiny") == second_run
    assert stack.get("/api/v1/models/tiny/neurons", params={"layer": 0, "limit": 1}).json()["total"] == neurons
    kept = stack.get("/api/v1/models/tiny/neurons/0/1/annotations", headers={"Authorization": f"Bearer {token}"})
    assert [(a["annotator"], a["label"]) for a in kept.json()] == [("alice", "shallow")], kept.text

    # 6. A worker on a schema newer than its code refuses, in one line, without touching it.
    stack.psql("CREATE DATABASE future", database="postgres")
    future_url = f"postgresql://catalog:{stack.password}@db:5432/future"
    stack.compose("run", "--rm", "--no-deps", "-T", "-e", f"CATALOG_DATABASE_URL={future_url}", "api",
                  "neuron-catalog", "db", "upgrade")
    stack.psql("UPDATE alembic_version SET version_num = '9999_from_the_future'", database="future")
    refused = stack.compose("run", "--rm", "--no-deps", "-T", "-e", f"CATALOG_DATABASE_URL={future_url}", "worker",
                            "neuron-catalog", "worker", check=False, timeout=120)
    assert refused.returncode != 0
    lines = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "newer" in lines[0] and f"(head {head()})" in lines[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr + refused.stdout
    assert stack.psql("SELECT version_num FROM alembic_version", database="future") == "9999_from_the_future"

    # 7. down -v leaves nothing of the project.
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in ("ps -aq", "network ls -q", "volume ls -q"):
        left = subprocess.run(["docker", *kind.split(), "--filter", label], capture_output=True, text=True, check=True)
        assert left.stdout.strip() == "", f"docker {kind}: {left.stdout}"

    timings["total"] = time.monotonic() - t_start
    print("\ncompose stack timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + "; healthy after " + ", ".join(f"{k} {v:.1f}" for k, v in healthy.items()), file=sys.stderr)


def _wait_request(stack: Stack, request_id: str, done: Any) -> tuple[str, str, int, str]:
    deadline = time.monotonic() + RUN_LIMIT_S
    while True:
        row = stack.request_row(request_id)
        if done(*row):
            return row
        assert row[0] in ("queued", "running"), f"request {request_id} ended early: {row}"
        assert time.monotonic() < deadline, f"request {request_id} stuck at {row}"
        time.sleep(0.3)


def _wait_run_id(stack: Stack, request_id: str) -> int:
    """The run a request's worker planned (registered with its pass shards)."""
    found = _wait_for(stack, lambda: stack.psql(f"SELECT run_id FROM extraction_requests WHERE id = {int(request_id)} "
                                                "AND run_id IS NOT NULL") or None, f"request {request_id} planned")
    return int(found)


def _wait_for(stack: Stack, probe: Callable[[], Any], what: str) -> Any:
    """Poll ``probe`` until it returns something truthy; on a stuck stack, fail with the workers' logs."""
    deadline = time.monotonic() + RUN_LIMIT_S
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            logs = stack.compose("logs", "--tail", "60", "worker", check=False).stdout
            pytest.fail(f"waited {RUN_LIMIT_S:.0f}s for {what}\n{logs[-6000:]}")
        time.sleep(0.3)


def _wait_api(stack: Stack, path: str) -> None:
    """The API recovers by itself once the database is back (no restart of the API)."""
    deadline = time.monotonic() + HEALTHY_LIMIT_S
    while True:
        try:
            r = stack.get(path)
            if r.status_code == 200:
                return
            assert r.status_code == 503 and "Traceback" not in r.text, r.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{path} did not recover"
        time.sleep(0.5)
