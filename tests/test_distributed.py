"""Distributed extraction end to end: `extract --distributed` through `neuron-catalog worker` processes,
a real Redis broker and the session's real Postgres.

The tests only ever act as users and operators do: the CLI queues and follows, workers are separate
process groups, a worker machine dying is ``SIGKILL`` on its whole process group. Where a test needs
a run to be caught mid-way it holds the catalog name's publish lock (as tests/test_runs.py does), so
that the run waits, with every row written, at a known point: no timing decides what is tested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from cli_runner import CLI, REPO, Result, cli
from sqlalchemy import create_engine, delete, make_url, pool, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tiny_models import D_MLP, N_LAYERS

from catalog.export import export
from catalog.runs.lifecycle import INTERRUPTED
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store import migrate
from catalog.store.database import dispose_engine, session_scope
from catalog.store.models import CatalogModel, ExtractionRequest, ExtractionRun, RunStatus

# Generous upper bounds for a stuck process, never assertions about speed.
LIMIT_S = 180.0
SWEEP_INTERVAL_S = "2"
NAME_PREFIX = "test-dist-"
PUBLISH_WAIT_STAGE = "weights, projections and ingest"  # the run's stage while it waits to publish
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
    """Every CLI subprocess of this module (they read os.environ) uses the test's own Redis."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATALOG_BROKER_URL", redis_url)
        yield redis_url


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("dist-models")
    return {seed: tiny_models.save("gpt2", root / f"gpt2-seed{seed}", seed=seed) for seed in (0, 1)}


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


def start_worker(log: Path, redis_url: str) -> Worker:
    env = {**os.environ, "CATALOG_BROKER_URL": redis_url, "CATALOG_SWEEP_INTERVAL_S": SWEEP_INTERVAL_S,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen([CLI, "worker", "--concurrency", "1", "--loglevel", "INFO"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
def workers(redis_url: str, migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    """Two `neuron-catalog worker` process groups (each: Celery's main process and one child), with a
    2 s sweep interval; a test may kill one."""
    root = tmp_path_factory.mktemp("dist-workers")
    started = [start_worker(root / f"worker{i}.log", redis_url) for i in range(2)]
    try:
        def up_or_gone(w: Worker) -> bool:
            return " ready." in w.text() or w.proc.poll() is not None

        for w in started:
            wait_for(lambda: up_or_gone(w), "a worker to start", started)  # noqa: B023  (called at once)
            assert w.proc.poll() is None, logs(started)
        yield started
    finally:
        for w in started:
            stop_worker(w)


# --- helpers -------------------------------------------------------------------------------------


def request_row(engine: Engine, request_id: int) -> ExtractionRequest:
    with Session(engine, expire_on_commit=False) as s:
        row = s.get(ExtractionRequest, request_id)
        assert row is not None
        return row


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


class PublishLock:
    """The advisory lock that publishers of a catalog name take, held in a transaction of the test's own:
    a run of that name waits for it with all its rows written, before its publishing commit."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.conn = engine.connect()
        self.trans = self.conn.begin()
        self.conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})

    def waiters(self) -> int:
        """Database sessions waiting for a lock: runs stopped by this one (directly, or behind a run
        that holds rows they must wait for)."""
        with self.conn.engine.connect() as c:
            return int(c.scalar(text("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")))

    def release(self) -> None:
        if self.trans.is_active:
            self.trans.rollback()
        self.conn.close()


@pytest.fixture
def publish_lock(engine: Engine) -> Iterator[Callable[[str], PublishLock]]:
    taken: list[PublishLock] = []

    def take(name: str) -> PublishLock:
        taken.append(PublishLock(engine, name))
        return taken[-1]

    yield take
    for lock in taken:
        lock.release()


def publish_line(r: Result, request_id: int, attempt: int) -> int:
    m = re.search(rf"^request {request_id}: published \(run (\d+), attempt {attempt}\)$", r.stderr, re.MULTILINE)
    assert m, r.stderr
    return int(m.group(1))


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


def test_distributed_extract_exports_what_an_in_process_extract_does(
    workers: list[Worker], engine: Engine, models: dict[int, Path], corpus: Path, tmp_path: Path,
) -> None:
    local, remote = unique("local"), unique("remote")
    options = ("--model", str(models[0]), "--corpus", str(corpus), "--top-n", "4", "--window", "16")
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

    # the request: published once, by one attempt of a worker process, pointing at the current run
    req = latest_request(engine, remote)
    assert req is not None
    run_id = publish_line(r_remote, req.id, 1)
    assert int(m_remote["run"]) == run_id == req.run_id == current_run_id(engine, remote)
    assert (req.status, req.attempts, req.error) == ("published", 1, None)
    assert req.finished_at is not None and req.started_at is not None
    assert os.getpgid(holder_pid(req.holder)) in {w.pgid for w in workers}  # a worker's task process
    assert req.request["corpus"] == str(corpus) and req.request["params"]["top_n"] == 4

    # the export is the same file but for the catalog name and the run id in every record
    a = exported(engine, local, tmp_path / "local.jsonl")
    b = exported(engine, remote, tmp_path / "remote.jsonl")
    assert len(a) == len(b) == N_LAYERS * D_MLP
    assert all(rec["triggers"] for rec in b)  # the corpus pass ran on the worker

    def strip(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in rec.items() if k not in ("model", "run_id")} for rec in recs]

    assert strip(a) == strip(b)
    assert {r["model"] for r in b} == {remote} and {r["run_id"] for r in b} == {run_id}


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


def test_ctrl_c_stops_following_only(
    workers: list[Worker], engine: Engine, models: dict[int, Path], publish_lock: Callable[[str], PublishLock],
    tmp_path: Path,
) -> None:
    name = unique("ctrl-c")
    lock = publish_lock(name)  # the run will wait to publish, mid-way, until the test lets it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen([CLI, "extract", "--distributed", "--model", str(models[0]), "--name", name],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        req = wait_for(lambda: (q := latest_request(engine, name)) is not None and q.status == "running"
                       and run_stage(engine, q.run_id) == PUBLISH_WAIT_STAGE and lock.waiters() == 1 and q,
                       "the request's run to wait for the publish lock", workers)
        following = f"request {req.id}: running on {req.holder} (attempt 1), stage: {PUBLISH_WAIT_STAGE}"
        wait_for(lambda: following in err_path.read_text().splitlines(), "the CLI to show the run's stage", workers)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = err_path.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    assert err.splitlines()[-1] == (f"stopped following; the extraction goes on as request {req.id}, run {req.run_id} "
                                    "(see `neuron-catalog runs`)"), err
    assert request_row(engine, req.id).status == "running"  # the worker goes on ...
    lock.release()
    done = wait_for(lambda: request_row(engine, req.id).status == "published" and request_row(engine, req.id),
                    "the request to be published", workers)
    assert done.run_id == req.run_id == current_run_id(engine, name) and done.attempts == 1  # ... to the end
    r = cli("runs")
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:3] == ["request", str(req.id), name] and "published" in line
               for line in r.stdout.splitlines()), r.stdout


def test_worker_killed_mid_run_is_taken_over_and_published_once(
    workers: list[Worker], engine: Engine, models: dict[int, Path], publish_lock: Callable[[str], PublishLock],
) -> None:
    """SIGKILL the whole process group of the worker running a request, as a machine dying: the other
    worker's sweeper re-sends it, the other worker runs it as attempt 2, and it is published exactly
    once; until then the previous catalog stays current."""
    name = unique("killed")
    previous = extract(ExtractRequest(model=str(models[0]), name=name), engine=engine).run_id
    lock = publish_lock(name)
    r = cli("extract", "--distributed", "--no-wait", "--model", str(models[1]), "--name", name, timeout=LIMIT_S)
    assert r.returncode == 0, r.stderr
    request_id = int(r.stdout.strip())
    assert r.stderr.strip() == f"request {request_id} queued; follow it with `neuron-catalog runs`"

    # attempt 1: every row written, waiting to publish
    first = wait_for(lambda: (q := request_row(engine, request_id)).status == "running"
                     and run_stage(engine, q.run_id) == PUBLISH_WAIT_STAGE and lock.waiters() == 1 and q,
                     "attempt 1 to wait for the publish lock", workers)
    assert first.attempts == 1
    victim = next(w for w in workers if w.pgid == os.getpgid(holder_pid(first.holder)))
    survivor = next(w for w in workers if w is not victim)
    os.killpg(victim.pgid, signal.SIGKILL)
    victim.proc.wait(timeout=LIMIT_S)
    assert survivor.proc.poll() is None
    assert current_run_id(engine, name) == previous  # the outage: the old catalog is the current one

    # attempt 2, on the survivor, waits too: behind attempt 1's orphaned database session, which still
    # holds its uncommitted rows while it waits for the publish lock
    second = wait_for(lambda: (q := request_row(engine, request_id)).attempts == 2
                      and run_stage(engine, q.run_id) == PUBLISH_WAIT_STAGE and lock.waiters() == 2 and q,
                      "the sweeper to re-send the request and attempt 2 to wait for the publish lock", [survivor])
    assert second.status == "running" and second.holder != first.holder and second.run_id != first.run_id
    assert os.getpgid(holder_pid(second.holder)) == survivor.pgid
    assert second.resent_at is None  # cleared when attempt 2 took it
    assert "re-sent request(s)" in survivor.text() and str(request_id) in survivor.text()
    assert current_run_id(engine, name) == previous

    lock.release()  # attempt 1's session gets the lock first, finds its client gone and rolls back
    done = wait_for(lambda: request_row(engine, request_id).status == "published" and request_row(engine, request_id),
                    "the request to be published", [survivor])
    assert (done.attempts, done.holder, done.run_id, done.error) == (2, second.holder, second.run_id, None)
    assert current_run_id(engine, name) == second.run_id
    runs = {x.id: x for x in runs_of(engine, name)}
    assert [x.id for x in runs.values() if x.status == RunStatus.complete] == [second.run_id]  # exactly once
    # the killed attempt's run is reaped resumable (part 8); the request went on as a new run
    assert first.run_id in runs and runs[first.run_id].status == RunStatus.interrupted
    assert runs[first.run_id].error == INTERRUPTED
    assert previous not in runs  # superseded by the one publish, and deleted


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

    req = ExtractRequest(model="never-run", name=unique("held"))
    with held_request(engine, req, status="running", attempts=1, holder="alive:1") as request_id:
        assert run_request(request_id) is Outcome.held
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
    assert head == "0009"
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
