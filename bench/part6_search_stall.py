"""Part 6 benchmark: can a broad text pattern stall the service? (issue 15, "Hardening").

    .venv/bin/python bench/part6_search_stall.py --build-only            # once: the catalog
    .venv/bin/python bench/part6_search_stall.py --code /tmp/before --label before
    .venv/bin/python bench/part6_search_stall.py --label after

1. Build (once; reused while it exists in ``--data-dir``): bench/part3_search.py's synthetic
   GPT-2-XL-sized catalog (48 layers x 6,400 neurons = 307,200 neurons, 50 triggers each over
   500,000 prefixes cut from the WordNet corpus, SmolLM2's vocabulary), built by the same code
   with two changes that do not touch pattern search: the key/value vectors have ``--d-model``
   (default 64, not 1,600) dimensions and no HNSW index is built (this benchmark sends no
   token-ranking or similar request). The triggers, prefixes, ``neuron_search`` rows and their
   GIN indexes are those of part 3.
2. Serve: uvicorn as ``neuron-catalog serve`` runs it (one worker) from the source tree ``--code`` (default this
   checkout; the "before" figures run the previous commit from ``git worktree add /tmp/before HEAD``).
3. Measure: each common-word phrase alone (time and status); /healthz and ``layer=3`` latency
   idle; then ``--clients`` (16) clients sending the phrases over and over for ``--seconds`` while
   one prober measures /healthz and ``layer=3`` beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import part3_search as part3

NAME = "synthetic-gpt2-xl-patterns"
# The phrases of common words that ran to the statement timeout before part 6, and two that did not.
PHRASES = ["of of", "the of", "a a a a a a a a", '"of the"', "the of a", "of a the"]
CONTROLS = ["the", "a person", "xylophone"]


def build(d_model: int, layers: int) -> dict[str, float]:
    from catalog.loading import load

    part3.NAME, part3.D_MODEL, part3.N_LAYERS = NAME, d_model, layers
    tok = load("smollm2").tokenizer
    vocab_texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
    lines = [ln for ln in (REPO / "data" / "wordnet.txt").read_text().splitlines() if ln.strip()]
    t0 = time.perf_counter()
    times = part3.build(vocab_texts, lines)
    times["total"] = time.perf_counter() - t0
    return times


def start_server(url: str, port: int, code: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """``neuron-catalog serve`` from the source tree ``code`` (its ``catalog`` package first on the path)."""

    env = {**os.environ, "CATALOG_DATABASE_URL": url, "PYTHONPATH": str(code), **env_extra}
    # uvicorn as `neuron-catalog serve` runs it (one worker), without serve's migration step: the old
    # tree does not know the newer migrations this database has
    server = subprocess.Popen(
        [sys.executable, "-c", ("import catalog, sys, uvicorn; print('serving', catalog.__file__, file=sys.stderr); "
                                f"uvicorn.run('catalog.api.app:create_app', factory=True, host='127.0.0.1', port={port}, "
                                "log_level='warning', access_log=False)")], env=env, cwd=str(code))
    return server, part3.wait_healthy(server, f"http://127.0.0.1:{port}")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def timed(c: Any, url: str, **params: Any) -> tuple[float, int, Any]:
    import httpx

    t0 = time.perf_counter()
    try:
        r = c.get(url, params=params)
        status, body = r.status_code, r
    except httpx.HTTPError as exc:  # a client timeout counts as an answer that never came
        status, body = 0, exc
    return (time.perf_counter() - t0) * 1000, status, body


def measure(base: str, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    api = f"{base}/api/v1/models/{NAME}/neurons"
    out: dict[str, Any] = {"alone": {}}
    with httpx.Client(timeout=60) as c:
        for q in PHRASES + CONTROLS:
            ms, status, r = timed(c, api, q=q)
            extra = ""
            if status == 200:
                body = r.json()
                extra = f"{len(body['items'])} items, total {body.get('total')} exact={body.get('total_exact')}"
            elif status:
                extra = r.json().get("detail", "")[:110]
            out["alone"][q] = {"ms": round(ms, 1), "status": status, "note": extra}
            print(f"  alone {q!r:>22}: {ms:8.1f} ms  {status}  {extra}", flush=True)
        idle: dict[str, list[float]] = {"healthz": [], "layer=3": []}
        for _ in range(20):
            idle["healthz"].append(timed(c, f"{base}/healthz")[0])
            idle["layer=3"].append(timed(c, api, layer=3)[0])
    out["idle"] = {k: {"p50": round(pct(v, 50), 1), "max": round(max(v), 1)} for k, v in idle.items()}
    print(f"  idle: {out['idle']}", flush=True)

    stop = time.perf_counter() + seconds
    statuses: Counter[int] = Counter()
    heavy_ms: list[float] = []
    retry_after = [0]
    lock = threading.Lock()

    def heavy(i: int) -> None:
        with httpx.Client(timeout=30) as hc:
            n = i
            while time.perf_counter() < stop:
                ms, status, r = timed(hc, api, q=PHRASES[n % len(PHRASES)])
                n += 1
                with lock:
                    statuses[status] += 1
                    heavy_ms.append(ms)
                    if status == 429 and "retry-after" in r.headers:
                        retry_after[0] += 1
                if status == 429:  # a well-behaved client waits as told
                    time.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))

    probe: dict[str, list[tuple[float, int]]] = {"healthz": [], "layer=3": []}

    def prober() -> None:
        with httpx.Client(timeout=30) as pc:
            time.sleep(0.5)  # the heavy queries are running
            while time.perf_counter() < stop:
                ms, status, _ = timed(pc, f"{base}/healthz")
                probe["healthz"].append((ms, status))
                ms, status, _ = timed(pc, api, layer=3)
                probe["layer=3"].append((ms, status))
                time.sleep(0.2)

    threads = [threading.Thread(target=heavy, args=(i,)) for i in range(clients)] + [threading.Thread(target=prober)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    out["load"] = {
        "clients": clients, "seconds": round(elapsed, 1), "heavy_statuses": dict(sorted(statuses.items())),
        "heavy_ms": {"p50": round(pct(heavy_ms, 50), 1), "p99": round(pct(heavy_ms, 99), 1),
                     "max": round(max(heavy_ms, default=float("nan")), 1)},
        "429_with_retry_after": retry_after[0],
    }
    for k, v in probe.items():
        ms = [m for m, _ in v]
        out["load"][k] = {"n": len(v), "non_200": sum(s != 200 for _, s in v), "p50": round(pct(ms, 50), 1),
                          "p99": round(pct(ms, 99), 1), "max": round(max(ms, default=float("nan")), 1)}
    print(f"  under load: {json.dumps(out['load'])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/var/tmp/neuron-catalog-bench6"))
    ap.add_argument("--d-model", type=int, default=64, help="vector width (pattern search does not read vectors)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--code", type=Path, default=REPO, help="source tree the server runs")
    ap.add_argument("--label", default="after")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"# part 6 benchmark ({args.label}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs", flush=True)

    from sqlalchemy import text

    from catalog.read.catalog import current_run
    from catalog.store import migrate
    from catalog.store.database import database_url, get_engine, session_scope

    migrate.upgrade(None)
    with session_scope() as s:
        have = current_run(s, NAME)
    if have is None:
        times = build(args.d_model, args.layers)
        print("build:", json.dumps({k: round(v, 1) for k, v in times.items()}), flush=True)
    else:
        print("build: reused;", json.dumps({k: round(v, 1) for k, v in (have[1].timings or {}).items()}))
    with get_engine().connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM neurons n JOIN catalog_models m ON m.current_run_id = n.run_id "
                              "WHERE m.name = :n"), {"n": NAME}).scalar()
        size = conn.scalar(text("SELECT pg_database_size(current_database())"))
    print(f"catalog: {n} neurons; database {size / 2**30:.2f} GiB", flush=True)
    if args.build_only:
        return
    env_extra = dict(kv.split("=", 1) for kv in args.server_env)
    server, base = start_server(database_url(), args.port, args.code.resolve(), env_extra)
    try:
        figures = measure(base, args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(30)
    figures.update(label=args.label, code=str(args.code), server_env=env_extra, neurons=n)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
