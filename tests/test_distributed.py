"""Distributed extraction end to end (parts 7 and 9): `extract --distributed` spreads one run's shards
over `neuron-catalog worker` processes, through a real Redis broker and the session's real Postgres.

The tests only ever act as users and operators do: the CLI queues and follows, workers are separate
process groups (or processes in network namespaces of their own: other hosts), a worker machine
dying is ``SIGKILL`` on its whole process group. Where a test needs a run caught mid-way it holds a
lock of its own in Postgres: ``shard_states`` in SHARE mode stops every worker inside the commit of
the shard it just computed (mid-shard), ``run_shards`` stops the planner before it registers the
run, a row lock keeps one shard from being taken. No timing decides what is tested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import netns
import pytest
import tiny_models
from cli_runner import CLI, REPO, Result, cli
from sqlalchemy import create_engine, delete, func, make_url, pool, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tiny_models import D_MLP, N_LAYERS

from catalog.config import settings
from catalog.export import export
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store import migrate
from catalog.store.database import dispose_engine, session_scope
from catalog.store.models import (
    CatalogModel,
    ExtractionRequest,
    ExtractionRun,
    RunShard,
    RunStatus,
    ShardState,
)

# Generous upper bounds for a stuck process, never assertions about speed.
LIMIT_S = 180.0
SWEEP_INTERVAL_S = "2"
NAME_PREFIX = "test-dist-"
UNREACHABLE_DB = "postgresql://nobody@127.0.0.1:1/x"
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


def unique(what: str) -> str:
    return f"{NAME_PREFIX}{what}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def engine(engine: Engine) -> Iterator[Engine]:
    yield engine
    with session_scope(engine) as s:  # the database is the session's: leave no catalog or request behind
        s.execute(delete(ExtractionRequest).where(
            ExtractionRequest.request["name"].astext.startswith(NAME_PREFIX, autoescape=True)))
        s.execute(delete(CatalogModel).where(CatalogModel.name.startswith(NAME_PREFIX, autoescape=True)))


@pytest.fixture(scope="module", autouse=True)
def broker(redis_url: str) -> Iterator[str]:
    """Every CLI subprocess of this module (they read os.environ) uses the test's own Redis, and keeps
    no window starts (ablation.StartCache): the workers' catalogs are compared with in-process ones
    bit for bit (tests/test_shards.py's exact_placement)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATALOG_BROKER_URL", redis_url)
        mp.setenv("CATALOG_ABLATION_START_CACHE_MB", "0")
        mp.setattr(settings, "ablation_start_cache_mb", 0)
        yield redis_url


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Path]:
    """GPT-2s of seeds 0 and 1 (also as "gpt2": seed 0) and a Llama."""
    root = tmp_path_factory.mktemp("dist-models")
    made: dict[Any, Path] = {seed: tiny_models.save("gpt2", root / f"gpt2-seed{seed}", seed=seed) for seed in (0, 1)}
    return {**made, "gpt2": made[0], "llama": tiny_models.save("llama", root / "llama", seed=3)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist-corpus") / "corpus.txt"
    path.write_text(
        "the cat sat on the mat .\n"
        "a big dog ran fast in the green house .\n"
        "the small bird sang to the sun and the moon .\n"
        "a red tree is on the river , and the blue bird was slow .\n"
        "the dog was slow and the cat was fast .\n"
    )
    return path


# --- worker processes ----------------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started in a session of its own: its group is its pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(log: Path, redis_url: str, host: netns.Host | None = None) -> Worker:
    """A worker process group; ``host``: inside that network namespace, with its URLs (another machine)."""
    env = {**os.environ, "CATALOG_BROKER_URL": redis_url, "CATALOG_SWEEP_INTERVAL_S": SWEEP_INTERVAL_S,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [CLI, "worker", "--concurrency", "1", "--loglevel", "INFO"]
    with log.open("wb") as out:
        if host is None:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        else:
            proc = host.popen(argv, cwd=REPO, env=host.env(env), stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    return Worker(proc, log)


def stop_worker(w: Worker) -> None:
    if w.proc.poll() is None:
        os.killpg(w.pgid, signal.SIGTERM)  # warm shutdown, as an operator's Ctrl-C
        try:
            w.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(w.pgid, signal.SIGKILL)
            w.proc.wait()


def logs(workers: list[Worker]) -> str:
    return "\n".join(f"--- worker {w.proc.pid} (exit {w.proc.poll()}):\n{w.text()[-3000:]}" for w in workers)


def wait_for(condition: Callable[[], Any], what: str, workers: list[Worker]) -> Any:
    """Poll ``condition`` until it is truthy; fail (with the workers' logs) if it never is."""
    import time

    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{logs(workers)}")


@pytest.fixture(scope="module")
def worker_pool() -> Iterator[list[Worker]]:
    """The module's `neuron-catalog worker` process groups (each: Celery's main process and one
    child, with a 2 s sweep interval), stopped at the end; a test may kill one."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            stop_worker(w)


@pytest.fixture
def workers(worker_pool: list[Worker], redis_url: str, migrated_db: str,
            tmp_path_factory: pytest.TempPathFactory) -> list[Worker]:
    """Two live workers: the module's, with any that an earlier test killed replaced."""
    live = [w for w in worker_pool if w.proc.poll() is None]
    while len(live) < 2:
        w = start_worker(tmp_path_factory.mktemp("dist-worker") / "worker.log", redis_url)
        worker_pool.append(w)
        live.append(w)

    def up_or_gone(w: Worker) -> bool:
        return " ready." in w.text() or w.proc.poll() is not None

    for w in live:
        wait_for(lambda: up_or_gone(w), "a worker to start", live)  # noqa: B023  (called at once)
        assert w.proc.poll() is None, logs(live)
    return live


# --- helpers -------------------------------------------------------------------------------------


T = TypeVar("T")


def row_of(engine: Engine, model: type[T], key: int) -> T:
    """One row as it is now (a fresh session each time)."""
    with Session(engine, expire_on_commit=False) as s:
        row = s.get(model, key)
        assert row is not None
        return row


def request_row(engine: Engine, request_id: int) -> ExtractionRequest:
    return row_of(engine, ExtractionRequest, request_id)


def latest_request(engine: Engine, name: str) -> ExtractionRequest | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalar(select(ExtractionRequest).where(ExtractionRequest.request["name"].astext == name)
                        .order_by(ExtractionRequest.id.desc()).limit(1))


def run_stage(engine: Engine, run_id: int | None) -> str | None:
    if run_id is None:
        return None
    with Session(engine) as s:
        run = s.get(ExtractionRun, run_id)
        return None if run is None else run.progress.get("stage")


def current_run_id(engine: Engine, name: str) -> int | None:
    with Session(engine) as s:
        return s.scalar(select(CatalogModel.current_run_id).where(CatalogModel.name == name))


def runs_of(engine: Engine, name: str) -> list[ExtractionRun]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(ExtractionRun).join(CatalogModel, CatalogModel.id == ExtractionRun.model_id)
                              .where(CatalogModel.name == name).order_by(ExtractionRun.id)))


def exported(engine: Engine, name: str, out: Path) -> list[dict[str, Any]]:
    """`neuron-catalog export`'s JSONL of ``name`` (the same function), parsed."""
    with Session(engine) as s:
        export(s, name, out)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def error_lines(r: Result) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def holder_pid(holder: str | None) -> int:
    assert holder is not None and re.fullmatch(r"[^:]+:\d+", holder), holder
    return int(holder.rsplit(":", 1)[1])


SUMMARY = re.compile(r"^catalog '(?P<name>[^']+)': (?P<layers>\d+) layers x (?P<d>\d+) neurons \(run (?P<run>\d+)\); (?P<t>.*)$")


def summary_of(r: Result) -> tuple[re.Match[str], list[str]]:
    """The in-process extract's three summary lines: the first, and the timings' names in order."""
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    assert lines[1] == f"  export it: neuron-catalog export --model {m['name']} --out {m['name']}.jsonl"
    assert lines[2] == f"  look at one neuron: neuron-catalog show --model {m['name']} --layer 0 --neuron 0"
    timings = [part.rsplit(" ", 1)[0] for part in m["t"].split(", ")]
    return m, timings


# --- tests ---------------------------------------------------------------------------------------


SHARD_OPTIONS = ("--top-n", "4", "--window", "16", "--shard-tokens", "12")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_workers_export_what_an_in_process_extract_does(
    workers: list[Worker], engine: Engine, models: dict[Any, Path], corpus: Path, tmp_path: Path, family: str,
) -> None:
    """One run's shards spread over both workers: the same summary and the same export as an
    in-process extract with the same plan."""
    local, remote = unique(f"local-{family}"), unique(f"remote-{family}")
    options = ("--model", str(models[family]), "--corpus", str(corpus), *SHARD_OPTIONS)
    with ThreadPoolExecutor(2) as pool_:
        f_local = pool_.submit(cli, "extract", "--name", local, *options, timeout=LIMIT_S)
        f_remote = pool_.submit(cli, "extract", "--distributed", "--name", remote, *options, timeout=LIMIT_S)
        r_local, r_remote = f_local.result(), f_remote.result()
    assert r_local.returncode == 0, r_local.stderr
    assert r_remote.returncode == 0, f"{r_remote.stderr}\n{logs(workers)}"
    assert error_lines(r_remote) == []

    # the same summary lines as the in-process extract: name, shape, run, the same timings in order
    m_local, t_local = summary_of(r_local)
    m_remote, t_remote = summary_of(r_remote)
    assert (m_remote["name"], int(m_remote["layers"]), int(m_remote["d"])) == (remote, N_LAYERS, D_MLP)
    assert (m_local["layers"], m_local["d"]) == (m_remote["layers"], m_remote["d"])
    assert t_remote == t_local

    # the request: planned once by a worker, published by the run's finish step
    req = latest_request(engine, remote)
    assert req is not None
    run_id = int(m_remote["run"])
    assert run_id == req.run_id == current_run_id(engine, remote)
    assert (req.status, req.attempts, req.error) == ("published", 1, None)
    assert os.getpgid(holder_pid(req.holder)) in {w.pgid for w in workers}  # a worker's task process
    assert f"request {req.id}: planned as run {run_id}; its shards are queued" in r_remote.stderr
    run = runs_of(engine, remote)[-1]
    assert (run.driver, run.status, run.step) == ("queue", RunStatus.complete, "done")
    shards = shards_of(engine, run_id)
    assert len([s for s in shards if s.kind == "pass"]) == 5  # a document a shard
    assert all(s.status == "done" and s.attempts == 1 for s in shards)
    assert {os.getpgid(holder_pid(s.holder)) for s in shards} <= {w.pgid for w in workers}
    shown = cli("runs", "show", str(run_id))
    assert shown.returncode == 0, shown.stderr
    for s in shards:  # `runs show`: each shard with its status, attempts and the worker that did it
        assert any(line.split()[:2] == [s.kind, str(s.index)] and "done" in line and "attempts 1" in line
                   and line.endswith(f"by {s.holder}") for line in shown.stdout.splitlines()), shown.stdout

    a = exported(engine, local, tmp_path / "local.jsonl")
    b = exported(engine, remote, tmp_path / "remote.jsonl")
    assert len(a) == len(b) == N_LAYERS * D_MLP
    assert all(rec["triggers"] for rec in b)  # the corpus pass ran on the workers
    assert strip(a) == strip(b)
    assert {r["model"] for r in b} == {remote} and {r["run_id"] for r in b} == {run_id}


def strip(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Export records without what names the catalog (its name and run id)."""
    return [{k: v for k, v in rec.items() if k not in ("model", "run_id")} for rec in recs]


def test_bad_requests_end_with_one_error_line(
    workers: list[Worker], engine: Engine, models: dict[int, Path], tmp_path: Path,
) -> None:
    """A corpus missing on the worker, an unreachable broker, an unreachable database."""
    name = unique("bad")
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    before = exported(engine, name, tmp_path / "before.jsonl")
    missing = tmp_path / "no-such-corpus.txt"
    base = ("extract", "--distributed", "--model", str(models[1]), "--name", name)
    cases: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "corpus": ((*base, "--corpus", str(missing)), {}),
        "broker": ((*base, "--corpus", str(missing)), {"CATALOG_BROKER_URL": UNREACHABLE_BROKER}),
        "database": (base, {"CATALOG_DATABASE_URL": UNREACHABLE_DB}),
    }
    with ThreadPoolExecutor(len(cases)) as pool_:
        futures = {k: pool_.submit(cli, *args, env=env, timeout=LIMIT_S) for k, (args, env) in cases.items()}
        results = {k: f.result() for k, f in futures.items()}

    # the worker's corpus error: one error line, the last, after the progress lines
    r = results["corpus"]
    assert r.returncode == 1, f"{r.stderr}\n{logs(workers)}"
    errors = error_lines(r)
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    assert str(missing) in errors[0] and "failed" in errors[0], errors[0]
    assert r.stdout == ""
    m = re.match(r"error: request (\d+) failed: ", errors[0])
    assert m, errors[0]
    req = request_row(engine, int(m.group(1)))
    assert req.status == "failed" and req.attempts == 1, req
    assert req.error is not None and str(missing) in req.error and req.run_id is None
    assert errors[0] == f"error: request {req.id} failed: {req.error}"
    # the previous catalog is untouched
    assert current_run_id(engine, name) == previous
    assert exported(engine, name, tmp_path / "after.jsonl") == before
    assert [(x.id, x.status) for x in runs_of(engine, name)] == [(previous, RunStatus.complete)]

    # the broker: nothing is left queued (the request that could not be sent is failed)
    r = results["broker"]
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot reach the broker at {UNREACHABLE_BROKER}: "), r.stderr
    assert "connection refused" in r.stderr.lower()
    with Session(engine) as s:
        sent = s.scalars(select(ExtractionRequest).where(ExtractionRequest.request["name"].astext == name)).all()
    assert sorted(q.status for q in sent) == ["failed", "failed"]
    assert any(q.error is not None and q.error.startswith("not sent: cannot reach the broker") for q in sent)

    r = results["database"]
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and error_lines(r) == r.stderr.splitlines(), r.stderr
    assert "cannot connect to the database" in r.stderr and "127.0.0.1:1" in r.stderr


def test_requests_whose_workers_died_too_often_are_given_up(
    workers: list[Worker], engine: Engine, redis_url: str,
) -> None:
    """A running request with no live holder that was started the maximum number of times (3): the
    sweeper re-sends it and the worker that gets it marks it failed instead of starting it again. A
    delivery of a published request does nothing."""
    from workers.celery_app import create_app
    from workers.tasks import RUN_REQUEST

    with session_scope(engine) as s:
        dead = ExtractionRequest(request={"model": "never-run", "name": unique("dead")}, status="running",
                                 attempts=3, holder="gone-host:1")
        done = ExtractionRequest(request={"model": "never-run", "name": unique("done")}, status="published",
                                 attempts=1, holder="gone-host:2")
        s.add_all([dead, done])
        s.flush()
        dead_id, done_id = dead.id, done.id

    given_up = wait_for(lambda: request_row(engine, dead_id).status == "failed" and request_row(engine, dead_id),
                        "the sweeper to re-send the dead request and a worker to give it up", workers)
    assert given_up.attempts == 3 and given_up.finished_at is not None
    assert given_up.error is not None and given_up.error.startswith(
        "gave up: the extraction was started 3 times and its worker died each time"), given_up.error
    assert given_up.resent_at is not None  # it went out again through the sweeper

    client = create_app(redis_url)  # a client on the test broker, sending what send_request sends
    try:
        client.send_task(RUN_REQUEST, args=[done_id], task_id=str(done_id), ignore_result=True)
    finally:
        client.close()
    wait_for(lambda: any(f"request {done_id}: done; nothing to do" in w.text() for w in workers),
             "a worker to receive the published request's message", workers)
    after = request_row(engine, done_id)
    assert (after.status, after.attempts, after.holder, after.run_id) == ("published", 1, "gone-host:2", None)


class TableLock:
    """A table lock held in a transaction of the test's own (released by ``release``), to stop runs
    at a known point: ``shard_states`` in SHARE mode stops every worker that finishes a shard inside
    its commit (computed, not committed: mid-shard); ``run_shards`` stops a planner's registration."""

    def __init__(self, engine: Engine, table: str, mode: str = "SHARE") -> None:
        self.conn = engine.connect()
        self.trans = self.conn.begin()
        self.conn.execute(text(f"LOCK TABLE {table} IN {mode} MODE"))

    def waiters(self) -> int:
        with self.conn.engine.connect() as c:
            return int(c.scalar(text("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")))

    def waiting(self, statement: str) -> int:
        """Sessions waiting for a lock whose statement starts with ``statement``."""
        with self.conn.engine.connect() as c:
            return int(c.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE :q"), {"q": statement + "%"}))

    def release(self) -> None:
        if self.trans.is_active:
            self.trans.rollback()
        self.conn.close()


@pytest.fixture
def table_lock(engine: Engine) -> Iterator[Callable[..., TableLock]]:
    taken: list[TableLock] = []

    def take(table: str, mode: str = "SHARE") -> TableLock:
        taken.append(TableLock(engine, table, mode))
        return taken[-1]

    yield take
    for lock in taken:
        lock.release()


def shards_of(engine: Engine, run_id: int) -> list[RunShard]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(RunShard).where(RunShard.run_id == run_id)
                              .order_by(RunShard.kind.desc(), RunShard.index)))


def run_row(engine: Engine, run_id: int) -> ExtractionRun:
    return row_of(engine, ExtractionRun, run_id)


def queued_run(engine: Engine, name: str) -> ExtractionRun | None:
    found = [x for x in runs_of(engine, name) if x.driver == "queue"]
    return found[-1] if found else None


def broker_of_its_own(redis_url: str, db: int) -> str:
    """Another database of the test's Redis: a broker that the module's workers do not read."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def submit(name: str, model: Path, corpus: Path, tmp_path: Path,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], Path]:
    """`extract --distributed` in the background; returns the process and its stderr file."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    err_path = tmp_path / f"{name}.stderr"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen([CLI, "extract", "--distributed", "--model", str(model), "--name", name,
                                 "--corpus", str(corpus), *SHARD_OPTIONS],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    return proc, err_path


def finish(proc: subprocess.Popen[str], err_path: Path) -> Result:
    try:
        out, _ = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Result(proc.returncode, out, err_path.read_text())


def test_ctrl_c_stops_following_only(
    workers: list[Worker], engine: Engine, models: dict[Any, Path], corpus: Path,
    table_lock: Callable[..., TableLock], tmp_path: Path,
) -> None:
    name = unique("ctrl-c")
    lock = table_lock("shard_states")  # the run's shards will wait to commit until the test lets them
    proc, err_path = submit(name, models[0], corpus, tmp_path)
    try:
        run = wait_for(lambda: (x := queued_run(engine, name)) is not None and lock.waiters() == 2 and x,
                       "both workers to wait inside a shard's commit", workers)
        wait_for(lambda: f"run {run.id} corpus pass" in err_path.read_text(), "the CLI's progress bar", workers)
        proc.send_signal(signal.SIGINT)
        result = finish(proc, err_path)
    finally:
        lock.release()
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"stopped following; run {run.id} goes on on the workers "
                                              f"(`neuron-catalog runs show {run.id}`)"), result.stderr
    done = wait_for(lambda: run_row(engine, run.id).status == RunStatus.complete, "the run to be published", workers)
    assert done and current_run_id(engine, name) == run.id  # ... the workers went on to the end
    req = latest_request(engine, name)
    assert req is not None and (req.status, req.run_id) == ("published", run.id)


def test_a_worker_killed_mid_shard_costs_that_shard_once_more(
    workers: list[Worker], engine: Engine, models: dict[Any, Path], corpus: Path,
    table_lock: Callable[..., TableLock], tmp_path: Path,
) -> None:
    """SIGKILL the whole process group of a worker in the middle of a shard (its state computed, its
    commit not done), as a machine dying: the other worker's sweeper re-sends that shard, it is done
    once more (attempt 2) and no other shard is; the run publishes the in-process catalog."""
    name, reference = unique("killed"), unique("killed-ref")
    r = cli("extract", "--name", reference, "--model", str(models[1]), "--corpus", str(corpus), *SHARD_OPTIONS,
            timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    lock = table_lock("shard_states")
    proc, err_path = submit(name, models[1], corpus, tmp_path)
    try:
        run = wait_for(lambda: (x := queued_run(engine, name)) is not None and lock.waiters() == 2 and x,
                       "both workers to wait inside a shard's commit", workers)
        running = [s for s in shards_of(engine, run.id) if s.status == "running"]
        assert len(running) == 2 and len({s.holder for s in running}) == 2  # one shard on each worker
        victim_shard = running[0]
        victim = next(w for w in workers if w.pgid == os.getpgid(holder_pid(victim_shard.holder)))
        survivor = next(w for w in workers if w is not victim)
        os.killpg(victim.pgid, signal.SIGKILL)
        victim.proc.wait(timeout=LIMIT_S)
        assert current_run_id(engine, name) == previous
    finally:
        lock.release()
    result = finish(proc, err_path)
    assert result.returncode == 0, f"{result.stderr}\n{logs([survivor])}"
    run_id = int(summary_of(result)[0]["run"])
    assert run_id == run.id == current_run_id(engine, name)
    shards = shards_of(engine, run_id)
    again = [(s.kind, s.index) for s in shards if s.attempts != 1]
    assert again == [(victim_shard.kind, victim_shard.index)], [(s.kind, s.index, s.attempts) for s in shards]
    assert next(s for s in shards if s.index == victim_shard.index and s.kind == "pass").attempts == 2
    assert all(s.status == "done" for s in shards)
    assert [x.id for x in runs_of(engine, name) if x.status == RunStatus.complete] == [run_id]  # exactly once
    assert "re-sent the stranded pieces of queued runs" in survivor.text()
    assert strip(exported(engine, name, tmp_path / "a.jsonl")) == strip(exported(engine, reference, tmp_path / "b.jsonl"))


def test_with_every_worker_killed_runs_resume_finishes_without_recomputing(
    redis_url: str, migrated_db: str, engine: Engine, models: dict[Any, Path], corpus: Path, tmp_path: Path,
) -> None:
    """Both workers of this test die once all pass shards but the last are done (that one is held by
    a row lock of the test's, so no timing decides it); `runs resume` with new workers re-queues the
    rest and publishes the in-process catalog; the finished shards are not computed again. The
    test's workers have a broker of their own (the module's workers never see its messages)."""
    name, reference = unique("resumed"), unique("resumed-ref")
    redis_url = broker_of_its_own(redis_url, 1)
    r = cli("extract", "--name", reference, "--model", str(models["llama"]), "--corpus", str(corpus), *SHARD_OPTIONS,
            timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr
    first = [start_worker(tmp_path / f"first{i}.log", redis_url) for i in range(2)]
    second: list[Worker] = []
    holder = engine.connect()
    trans = holder.begin()
    try:
        for w in first:
            wait_for(lambda: " ready." in w.text(), "a worker to start", first)  # noqa: B023
        # wait (in the database, 5 ms a look) for the last shard's message to be sent, then lock its row:
        # the worker that takes it waits in its claim (four shards before it come first, in order)
        grab = threading.Thread(target=lambda: holder.execute(text(f"""
            DO $$ BEGIN LOOP
              PERFORM 1 FROM run_shards sh JOIN extraction_runs x ON x.id = sh.run_id
                JOIN catalog_models m ON m.id = x.model_id
              WHERE m.name = '{name}' AND sh.kind = 'pass' AND sh.index = 4 AND sh.sent_at IS NOT NULL
                AND sh.status = 'pending'
              FOR UPDATE OF sh;
              EXIT WHEN FOUND; PERFORM pg_sleep(0.005); END LOOP; END $$""")))
        grab.start()
        proc, err_path = submit(name, models["llama"], corpus, tmp_path, {"CATALOG_BROKER_URL": redis_url})
        grab.join(timeout=LIMIT_S)
        assert not grab.is_alive()
        run = wait_for(lambda: (x := queued_run(engine, name)) is not None
                       and [s.status for s in shards_of(engine, x.id)] == ["done"] * 4 + ["pending"] and x,
                       "the first four pass shards to be done", first)
        before = {s.index: (s.finished_at, s.attempts) for s in shards_of(engine, run.id)}
        for w in first:
            os.killpg(w.pgid, signal.SIGKILL)
            w.proc.wait(timeout=LIMIT_S)
        proc.send_signal(signal.SIGINT)
        finish(proc, err_path)
        trans.rollback()
        holder.close()
        assert run_row(engine, run.id).status == RunStatus.running  # a queue-driven run waits for workers
        second = [start_worker(tmp_path / f"second{i}.log", redis_url) for i in range(2)]
        r = cli("runs", "resume", str(run.id), env={"CATALOG_BROKER_URL": redis_url}, timeout=LIMIT_S)
        last = next(s for s in shards_of(engine, run.id) if s.kind == "pass" and s.index == 4)
        last_group = os.getpgid(holder_pid(last.holder)) if last.status == "done" else None  # while it lives
    finally:
        if trans.is_active:
            trans.rollback()
        holder.close()
        for w in first + second:
            stop_worker(w)
    assert r.returncode == 0, f"{r.stderr}\n{logs(second)}"
    assert f"run {run.id}: kept 4 finished shard(s); re-queued 1 piece(s)" in r.stderr
    assert int(summary_of(r)[0]["run"]) == run.id == current_run_id(engine, name)
    shards = {s.index: s for s in shards_of(engine, run.id) if s.kind == "pass"}
    assert {i: (s.finished_at, s.attempts) for i, s in shards.items() if i < 4} == {
        i: v for i, v in before.items() if i < 4}  # not recomputed
    assert shards[4].attempts == 1 and shards[4].status == "done"
    assert last_group in {w.pgid for w in second}
    assert strip(exported(engine, name, tmp_path / "a.jsonl")) == strip(exported(engine, reference, tmp_path / "b.jsonl"))


def test_a_shard_that_always_fails_fails_the_run_after_the_attempt_cap(
    workers: list[Worker], engine: Engine, models: dict[Any, Path], corpus: Path,
    table_lock: Callable[..., TableLock], tmp_path: Path,
) -> None:
    """The corpus changes between planning and the shards (as a worker host with another file would
    see it): every attempt fails; after CATALOG_SHARD_MAX_ATTEMPTS (3) the run fails with the error in
    one line, and the previous catalog stays current and served."""
    name = unique("always-fails")
    mine = tmp_path / "corpus.txt"
    mine.write_text(corpus.read_text())
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    before = exported(engine, name, tmp_path / "before.jsonl")
    lock = table_lock("run_shards")  # the planner stops at registering the run, its corpus read
    proc, err_path = submit(name, models[1], mine, tmp_path)
    try:
        wait_for(lambda: lock.waiting("INSERT INTO run_shards") == 1, "the planner to wait to register the run",
                 workers)
        with mine.open("a") as f:
            f.write("a line the plan never saw .\n")
    finally:
        lock.release()
    result = finish(proc, err_path)
    assert result.returncode == 1, f"{result.stderr}\n{logs(workers)}"
    errors = error_lines(result)
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    run = queued_run(engine, name)
    assert run is not None and run.status == RunStatus.failed and run.error is not None
    assert errors[0] == f"error: run {run.id} failed: {run.error}"
    assert re.fullmatch(r"ShardFailed: pass shard \d failed 3 time\(s\): CorpusError: the corpus .* is not the file "
                        rf"run {run.id} was planned on \(sha256 differs\): give every worker the same file", run.error)
    failed = [s for s in shards_of(engine, run.id) if s.status == "failed"]
    assert len(failed) >= 1 and all(s.attempts == 3 for s in failed)
    assert current_run_id(engine, name) == previous
    assert exported(engine, name, tmp_path / "after.jsonl") == before
    req = latest_request(engine, name)
    assert req is not None and (req.status, req.error) == ("failed", run.error)


def test_a_cancelled_run_is_never_published(
    workers: list[Worker], engine: Engine, models: dict[Any, Path], corpus: Path,
    table_lock: Callable[..., TableLock], tmp_path: Path,
) -> None:
    """`runs cancel` while both workers are inside a shard's commit: neither commits, the queued
    shards are revoked or dropped, the request ends cancelled and the catalog stays as it was."""
    name = unique("cancelled")
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    lock = table_lock("shard_states")
    proc, err_path = submit(name, models[1], corpus, tmp_path)
    with ThreadPoolExecutor(1) as pool_:
        try:
            run = wait_for(lambda: (x := queued_run(engine, name)) is not None and lock.waiters() == 2 and x,
                           "both workers to wait inside a shard's commit", workers)
            cancelling = pool_.submit(cli, "runs", "cancel", str(run.id), timeout=LIMIT_S)
            wait_for(lambda: run_row(engine, run.id).status == RunStatus.cancelled, "the run to be cancelled",
                     workers)
        finally:
            lock.release()
        r = cancelling.result()
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"run {run.id} cancelled \(it was running\); revoked its \d+ unfinished shard message\(s\)",
                        r.stdout.strip()), r.stdout
    result = finish(proc, err_path)
    assert result.returncode == 1 and error_lines(result) == [f"error: run {run.id} cancelled: cancelled"], result.stderr
    wait_for(lambda: sum(t.count(f"dropped: run {run.id} was cancelled") for t in map(Worker.text, workers)) >= 2,
             "both workers to drop their shard", workers)
    time.sleep(2 * float(SWEEP_INTERVAL_S))  # a sweep or two: nothing is sent again
    assert run_row(engine, run.id).status == RunStatus.cancelled and current_run_id(engine, name) == previous
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(ShardState).where(ShardState.run_id == run.id)) == 0
    req = latest_request(engine, name)
    assert req is not None and req.status == "cancelled"


@pytest.mark.netns
def test_workers_on_other_hosts(
    redis_url: str, database_url: str, migrated_db: str, engine: Engine, models: dict[Any, Path], corpus: Path,
    tmp_path: Path, worker_pool: list[Worker],
) -> None:
    """Two workers, each in a network namespace of its own (tests/netns.py): each reaches Postgres and
    Redis only over its veth, as a worker on another machine; the run equals the in-process one. They
    have a broker of their own, and the module's workers are stopped first: their sweepers share the
    database, and a sweeper sends any piece it finds unsent (a step the run has just moved to, or a
    shard between the plan's commit and its send) on its own broker, where one of them takes it (a
    local CI run saw a shard held by this host). With one broker, as deployed, that is harmless."""
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"this machine does not allow network namespaces: {reason}")
    for w in worker_pool:
        stop_worker(w)  # the `workers` fixture starts new ones for the tests after this one
    name, reference = unique("hosts"), unique("hosts-ref")
    r = cli("extract", "--name", reference, "--model", str(models[0]), "--corpus", str(corpus), *SHARD_OPTIONS,
            timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr
    redis_url = broker_of_its_own(redis_url, 2)
    with netns.hosts(2, {"database": database_url, "broker": redis_url}) as hosts:
        remote = [start_worker(tmp_path / f"{h.name}.log", redis_url, host=h) for h in hosts]
        try:
            for w in remote:
                wait_for(lambda: " ready." in w.text() or w.proc.poll() is not None, "a worker to start", remote)  # noqa: B023
                assert w.proc.poll() is None, logs(remote)
            r = cli("extract", "--distributed", "--name", name, "--model", str(models[0]), "--corpus", str(corpus),
                    *SHARD_OPTIONS, env={"CATALOG_BROKER_URL": redis_url}, timeout=LIMIT_S)
        finally:
            for w in remote:
                stop_worker(w)
    assert r.returncode == 0, f"{r.stderr}\n{logs(remote)}"
    run_id = int(summary_of(r)[0]["run"])
    holders = {s.holder.split(":")[0] for s in shards_of(engine, run_id) if s.holder}
    assert holders <= {h.name for h in hosts} and holders, holders  # the shards ran on the other hosts
    req = latest_request(engine, name)
    assert req is not None and req.holder is not None and req.holder.split(":")[0] in {h.name for h in hosts}
    assert strip(exported(engine, name, tmp_path / "a.jsonl")) == strip(exported(engine, reference, tmp_path / "b.jsonl"))


# --- the claim and the fence, in process ---------------------------------------------------------


@contextmanager
def held_request(engine: Engine, req: ExtractRequest, **values: Any) -> Iterator[int]:
    """A request row held as a live worker holds it (its advisory lock, on a session of the test's), so
    that the module's workers' sweepers leave it alone; cancelled before it is let go."""
    from dataclasses import asdict

    from catalog.requests import REQUEST_LOCK_CLASS

    with session_scope(engine) as s:
        row = ExtractionRequest(request=asdict(req), **values)
        s.add(row)
        s.flush()
        request_id = row.id
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:c, :r)"), {"c": REQUEST_LOCK_CLASS, "r": request_id})
        holder.commit()
        try:
            yield request_id
        finally:
            holder.execute(text("UPDATE extraction_requests SET status = 'cancelled' WHERE id = :r "
                                "AND status = 'running'"), {"r": request_id})
            holder.execute(text("SELECT pg_advisory_unlock_all()"))
            holder.commit()


def test_an_attempt_that_lost_its_claim_cannot_publish(engine: Engine, models: dict[int, Path]) -> None:
    """Attempt 1 runs; before it publishes another attempt takes the request over (attempts = 2): its
    publishing commit finds the fence changed and rolls back with the catalog untouched."""
    from catalog.requests import FenceLost, RequestFence

    name = unique("fenced")
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    req = ExtractRequest(model=str(models[1]), name=name)
    with held_request(engine, req, status="running", attempts=1, holder="here:1") as request_id:

        def take_over(stage: str) -> None:
            if stage == "publish":  # every row written: another worker claims the request now
                with engine.begin() as conn:
                    conn.execute(text("UPDATE extraction_requests SET attempts = 2, holder = 'there:2' WHERE id = :i"),
                                 {"i": request_id})

        with pytest.raises(FenceLost, match="no longer holds it; not publishing"):
            extract(req, engine=engine, fence=RequestFence(request_id, 1, "here:1"),
                    on_stage=take_over)
        assert current_run_id(engine, name) == previous
        row = request_row(engine, request_id)
        assert (row.status, row.attempts, row.holder, row.result) == ("running", 2, "there:2", None)
        lost = [x for x in runs_of(engine, name) if x.id != previous]
        assert len(lost) == 1 and lost[0].status == RunStatus.failed
        assert lost[0].error is not None and lost[0].error.startswith("FenceLost")
        assert row.run_id == lost[0].id  # registered under attempt 1, before the takeover

        # and an attempt that is not the request's current one cannot even start its run
        with pytest.raises(FenceLost, match="not starting its run"):
            extract(req, engine=engine, fence=RequestFence(request_id, 1, "here:1"))
        assert current_run_id(engine, name) == previous


def test_a_delivery_while_a_live_worker_holds_the_request_does_nothing(engine: Engine) -> None:
    from catalog.requests import Outcome, run_request
    from workers.tasks import CelerySender

    req = ExtractRequest(model="never-run", name=unique("held"))
    with held_request(engine, req, status="running", attempts=1, holder="alive:1") as request_id:
        assert run_request(request_id, sender=CelerySender()) is Outcome.held
        row = request_row(engine, request_id)
        assert (row.status, row.attempts, row.holder) == ("running", 1, "alive:1")


# --- schema revisions ----------------------------------------------------------------------------


@pytest.fixture
def databases(database_url: str) -> Iterator[dict[str, str]]:
    """Fresh databases on the test server: empty, at 0006 (older), at a revision from the future."""
    admin = create_engine(database_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    made: dict[str, str] = {}
    try:
        for kind in ("empty", "older", "newer"):
            db = f"dist_{kind}_{uuid.uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{db}"'))
            made[kind] = make_url(database_url).set(database=db).render_as_string(hide_password=False)
        migrate.upgrade(made["older"], "0006")
        migrate.upgrade(made["newer"])
        newer = create_engine(made["newer"], poolclass=pool.NullPool)
        with newer.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        newer.dispose()
        yield made
    finally:
        for url in made.values():
            dispose_engine(url)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
        admin.dispose()


def test_workers_refuse_a_database_of_another_schema(databases: dict[str, str], tmp_path: Path) -> None:
    head = migrate.head()
    assert head == "0013"
    env = {"CATALOG_BROKER_URL": UNREACHABLE_BROKER}  # never reached: they stop before

    def worker_on(kind: str) -> Result:
        return cli("worker", env={**env, "CATALOG_DATABASE_URL": databases[kind]}, timeout=LIMIT_S)

    def celery_on(kind: str) -> Result:
        import sys

        full = {**os.environ, **env, "CATALOG_DATABASE_URL": databases[kind], "HF_HUB_OFFLINE": "1"}
        p = subprocess.run([str(Path(sys.executable).with_name("celery")), "-A", "workers.celery_app", "worker",
                            "--pool=solo"], check=False, cwd=REPO, env=full, capture_output=True, text=True, timeout=LIMIT_S)
        return Result(p.returncode, p.stdout, p.stderr)

    with ThreadPoolExecutor(4) as pool_:
        futures = {kind: pool_.submit(worker_on, kind) for kind in databases}
        direct = pool_.submit(celery_on, "newer")
        results = {k: f.result() for k, f in futures.items()}
        results["celery"] = direct.result()

    expected = {
        "newer": f"error: the database schema is at revision 9999, newer than this worker's code (head {head}): "
                 "update the worker",
        "older": f"error: the database schema is at revision 0006, older than this worker's code (head {head}): "
                 "run neuron-catalog db upgrade",
        "empty": f"error: the database has no schema yet (this worker's code is at head {head}): "
                 "run neuron-catalog db upgrade",
    }
    for kind, line in expected.items():
        r = results[kind]
        assert r.returncode == 1, (kind, r)
        assert r.stderr.splitlines() == [line], (kind, r.stderr)
    r = results["celery"]
    assert r.returncode != 0, r
    errors = error_lines(r)
    assert errors == [expected["newer"]], r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == errors, r.stderr
    # nobody migrated anything
    assert migrate.current(databases["empty"]) is None and migrate.current(databases["older"]) == "0006"
    assert migrate.current(databases["newer"]) == "9999"
