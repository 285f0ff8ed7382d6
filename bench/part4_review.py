"""Part 4 benchmark: the review workflow through HTTP with 8 concurrent annotators.

    .venv/bin/python bench/part4_review.py [--layers 48] [--annotators 8] [--rounds 25] [--workers 2]

Builds (once per data dir) the part 3 synthetic catalog with GPT-2-XL's layer size (6,400 neurons
of 1,600-dim keys and values, 50 triggers and 30 top tokens each) through the normal ingest path,
with ``--layers`` layers (48, the default, is GPT-2-XL and the very catalog part 3 builds and
reuses; fewer give a quicker trial under their own name). Then ``neuron-catalog serve --workers N`` runs as a subprocess and
``--annotators`` processes, each an annotator with its own token, loop: fetch my next queue item (API), render
its neuron card (HTML), save an annotation (API PUT). Reports p50 / p99 of each step, of the
layer page with its plots and of /healthz (the floor) under the same load, each also as a ratio
to the floor measured in the same run, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import part3_search as p3

REPO = Path(__file__).resolve().parents[1]


def pct(xs: list[float], p: float) -> float:
    return p3.percentile(xs, p) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="default: part 3's catalog directory for 48 layers, its own for fewer")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=25, help="queue/card/save rounds per annotator")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    if args.data_dir is None:
        args.data_dir = Path("/var/tmp/neuron-catalog-bench3" if args.layers == 48 else "/var/tmp/neuron-catalog-bench4")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p3.N_LAYERS = args.layers
    if args.layers != 48:  # the same names as part 3's --layers
        p3.NAME = f"{p3.NAME}-{args.layers}-layers"
    name = p3.NAME
    print(f"# part 4 benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs")

    from sqlalchemy import text

    from catalog.annotations import service
    from catalog.read.catalog import current_run
    from catalog.store import migrate
    from catalog.store.database import database_url, get_engine, session_scope

    migrate.upgrade(None)
    with session_scope() as s:
        have = current_run(s, name)
    if have is None:
        from catalog.loading import load

        tok = load("smollm2").tokenizer
        vocab_texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
        lines = [ln for ln in (REPO / "data" / "wordnet.txt").read_text().splitlines() if ln.strip()]
        t0 = time.perf_counter()
        times = p3.build(vocab_texts, lines)
        print(f"build: {time.perf_counter() - t0:.0f} s;", json.dumps({k: round(v, 1) for k, v in times.items()}))
    else:
        print("build: reused")
    with get_engine().connect() as conn:
        size = conn.scalar(text("SELECT pg_database_size(current_database())"))
        n = conn.scalar(text("SELECT count(*) FROM neurons n JOIN catalog_models m ON m.current_run_id = n.run_id "
                             "WHERE m.name = :n"), {"n": name})
    print(f"catalog: {n} neurons in {args.layers} layers of {p3.D_MLP}; database {size / 2**30:.2f} GiB")
    stamp = datetime.now(UTC).strftime("%H%M%S")
    with session_scope() as s:
        tokens = {f"bench-{stamp}-{i}": service.add_annotator(s, f"bench-{stamp}-{i}") for i in range(args.annotators)}

    server, base = p3.start_server(database_url(), args.port, args.workers)
    try:
        run(base, name, tokens, args)
    finally:
        server.terminate()
        server.wait(30)


LABELS = ["shallow", "semantic", "shallow+semantic", "none"]


class _Client:
    """A keep-alive HTTP/1.1 client on the standard library: a fraction of httpx's CPU per request,
    which matters when eight of them share two cores with the server they measure."""

    def __init__(self, base: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: Any = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {**(headers or {}), **({"Content-Type": "application/json"} if data else {})}
        self.conn.request(method, path, body=data, headers=hdrs)
        r = self.conn.getresponse()
        return r.status, r.read()


def _annotator(base: str, name: str, who: str, token: str, seed: int, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """One annotator's session (its own process: no client shares a GIL with another)."""
    from urllib.parse import quote

    times: dict[str, list[float]] = {"queue_next": [], "card": [], "save": []}
    errors: list[str] = []
    h = {"Authorization": f"Bearer {token}"}
    c = _Client(base)
    m = quote(name)

    def timed(kind: str, method: str, path: str, body: Any = None) -> bytes:
        t = time.perf_counter()
        status, data = c.request(method, path, h, body)
        times[kind].append((time.perf_counter() - t) * 1000)
        if status >= 400:
            errors.append(f"{kind} {status} {data[:120]!r}")
        return data

    for i in range(rounds):
        item = json.loads(timed("queue_next", "GET", f"/api/v1/models/{m}/queue/next?per_layer=1000"))
        if item.get("done", True):
            break
        layer, neuron = item["layer"], item["neuron"]
        timed("card", "GET", f"/models/{m}/neurons/{layer}/{neuron}")
        label = LABELS[(seed + i) % 4]
        timed("save", "PUT", f"/api/v1/models/{m}/neurons/{layer}/{neuron}/annotations/{quote(who)}",
              {"label": label, "description": "" if label == "none" else f"pattern {i}"})
    return times, errors


def _viewer(base: str, name: str, layers: int, stop_at: float) -> tuple[dict[str, list[float]], list[str]]:
    from urllib.parse import quote

    times: dict[str, list[float]] = {"layer_page": [], "healthz": []}
    errors: list[str] = []
    c = _Client(base)
    layer = 0
    while time.time() < stop_at:
        for kind, path in (("layer_page", f"/models/{quote(name)}/layers/{layer % layers}"), ("healthz", "/healthz")):
            t = time.perf_counter()
            status, _ = c.request("GET", path)
            times[kind].append((time.perf_counter() - t) * 1000)
            if status >= 400:
                errors.append(f"{kind} {status}")
        layer += 1
    return times, errors


def run(base: str, name: str, tokens: dict[str, str], args: argparse.Namespace) -> None:
    from concurrent.futures import ProcessPoolExecutor

    import httpx

    with httpx.Client(base_url=base, timeout=60) as c:  # warm each worker's connections and caches
        for _ in range(10):
            c.get(f"/models/{name}/layers/0")
            c.get(f"/models/{name}/neurons/0/0")
    with ProcessPoolExecutor(max_workers=len(tokens) + 1) as pool:
        t0 = time.perf_counter()
        first = [pool.submit(_annotator, base, name, who, tok, i, args.rounds) for i, (who, tok) in enumerate(tokens.items())]
        alone = [j.result() for j in first]
        wall = time.perf_counter() - t0
        # second pass: the same annotators with someone reading layer pages (and the floor, /healthz)
        # at the same time, so the layer page is measured under the annotators' load
        view = pool.submit(_viewer, base, name, args.layers, time.time() + max(5.0, wall))
        again = [pool.submit(_annotator, base, name, who, tok, i + 7, args.rounds) for i, (who, tok) in enumerate(tokens.items())]
        beside = [j.result() for j in again]
        viewer = view.result()
    floor = pct(viewer[0]["healthz"], 50)
    n = sum(len(xs) for t, _ in alone for xs in t.values())
    print(f"{args.annotators} annotators (one process each) x {args.rounds} rounds, {args.workers} server workers: "
          f"first pass {n} requests in {wall:.1f} s ({n / wall:.0f} requests/s)")
    print(f"{'kind':<34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50/floor':>10} {'p99/floor':>10}")
    errors: list[str] = []
    for label, results in (("annotators alone", alone), ("with a layer-page reader", [*beside, viewer])):
        merged: dict[str, list[float]] = {}
        for t, e in results:
            errors += e
            for k, xs in t.items():
                merged.setdefault(k, []).extend(xs)
        for kind, xs in merged.items():
            print(f"{kind + ' (' + label + ')':<34} {len(xs):>5} {pct(xs, 50):>8.1f} {pct(xs, 99):>8.1f} "
                  f"{pct(xs, 50) / floor:>10.1f} {pct(xs, 99) / floor:>10.1f}")
    print(f"errors: {len(errors)}")
    for e in errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
