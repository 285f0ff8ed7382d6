"""Part 10 benchmark: the cost of one request of each search kind, in process, with EXPLAIN ANALYZE.

    .venv/bin/python bench/part10_requests.py [--data-dir DIR] [--reps 200]
    .venv/bin/python bench/part10_requests.py --data-dir /var/tmp/neuron-catalog-bench3 --catalog synthetic-gpt2-xl

Without --catalog: extracts SmolLM2 weights-only (once; reused while the catalog exists in DIR) into
the embedded Postgres and measures token ranking and similar neurons. With --catalog NAME (an
existing catalog, e.g. bench/part3_search.py's GPT-2-XL-sized one): every search kind the API
serves. The read functions the routes call are called in process, on the API's engine (its
connection settings), one request at a time, and each
kind reports the median wall time (on an idle machine: Postgres plus Python CPU, which never overlap
for one request), this process's CPU time per request, the statements it sends, and the sum of
their execution times under EXPLAIN ANALYZE. "list" answers come from the stored exact lists;
"scan" is what a request they cannot answer (one far layer, k above the list) costs: every vector
in range scored.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="embedded Postgres directory (kept, reused)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--catalog", help="an existing catalog with triggers: measure every search kind on it")
    args = ap.parse_args()
    if args.data_dir is not None:
        os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    elif "CATALOG_DATABASE_URL" not in os.environ:
        os.environ["CATALOG_DATA_DIR"] = tempfile.mkdtemp(prefix="nc-bench10-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from catalog.api.deps import api_engine
    from catalog.read import vectors
    from catalog.read.catalog import current_run
    from catalog.read.explain import capture, plans
    from catalog.runs.local import extract
    from catalog.runs.schemas import ExtractRequest
    from catalog.store import migrate
    from catalog.store.database import get_engine

    name = args.catalog or "smollm2-weights"
    engine = get_engine()
    served = api_engine()  # the requests run as the routes run them: the API's connection settings
    migrate.upgrade()
    print(f"# part 10 requests  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    with Session(bind=engine) as s:
        have = current_run(s, name)
    if have is None:
        if args.catalog:
            raise SystemExit(f"error: no catalog {args.catalog!r} in this database")
        t0 = time.perf_counter()
        summary = extract(ExtractRequest(model="smollm2", name=name), engine=engine)
        print(f"extracted {name} (weights only) in {time.perf_counter() - t0:.0f} s; stages (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in summary.timings.items()))
    with Session(bind=engine) as s:
        entry, run = current_run(s, name) or (None, None)
        assert entry is not None and run is not None
        last = int(entry.n_layers) - 1
        size = s.execute(text(
            "SELECT pg_total_relation_size('token_lists'), pg_total_relation_size('similar_lists'), "
            "pg_database_size(current_database())")).one()
    print(f"token_lists {size[0] / 2**20:.0f} MiB, similar_lists {size[1] / 2**20:.0f} MiB, database {size[2] / 2**20:.0f} MiB")

    kinds: dict[str, Callable[[Session], Any]] = {
        "token ranking, logit (list)": lambda s: vectors.token_ranking(s, name, "Paris", k=50),
        "token ranking, cosine folded (list)": lambda s: vectors.token_ranking(
            s, name, "Paris", k=50, order="cosine", projection="folded"),
        "token ranking, logit, layer 0 (scan)": lambda s: vectors.token_ranking(
            s, name, "Paris", k=50, layer_min=0, layer_max=0),
        "similar, value (list)": lambda s: vectors.similar(s, name, 20, 7, space="value", k=20),
        "similar, key (list)": lambda s: vectors.similar(s, name, 20, 7, space="key", k=20),
        "similar, key, layer 0 (scan)": lambda s: vectors.similar(
            s, name, last, 7, space="key", k=20, layer_min=0, layer_max=0),
    }
    if args.catalog:
        from explain_search import search_kinds  # bench/: the same calls docs/search-plans.md explains

        sql_kinds = {k: v for k, v in search_kinds(name).items() if not k.startswith(("token ranking", "similar"))}
        kinds = {**sql_kinds, **kinds}
    else:
        kinds["token ranking, logit, k=100 (scan)"] = lambda s: vectors.token_ranking(s, name, "Paris", k=100)
    print("| request | p50 wall ms | Python CPU ms | statements | EXPLAIN ANALYZE ms (sum) | answered by |")
    print("|---|---|---|---|---|---|")
    for kind, call in kinds.items():
        walls, cpus = [], []
        reps = args.reps if "(scan)" not in kind else max(10, args.reps // 10)
        for _ in range(reps):
            with Session(bind=served) as s:
                w0, c0 = time.perf_counter(), time.process_time()
                call(s)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
        with capture(served) as seen, Session(bind=served) as s:
            call(s)
        explained = plans(served, call)
        execution = sum(float(m) for _, plan in explained for m in re.findall(r"Execution Time: ([0-9.]+) ms", plan))
        by = "list" if "(list)" in kind else "scan" if "(scan)" in kind else "SQL"
        print(f"| {kind} | {1e3 * statistics.median(walls):.2f} | {1e3 * statistics.median(cpus):.2f} | "
              f"{len(seen)} | {execution:.2f} ({len(explained)} explained) | {by} |", flush=True)
    with Session(bind=engine) as s:
        for table, where in (("token_lists", "convention = 'raw' AND ranking = 'logit' AND token_id = 9490"),
                             ("similar_lists", "space = 'value' AND layer = 20 AND neuron = 7")):
            plan = s.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) SELECT ids, scores FROM {table} "
                                  f"WHERE run_id = {int(run.id)} AND {where}".replace("scores", "cosines" if
                                                                                   table == "similar_lists" else
                                                                                   "scores"))).scalars().all()
            print(f"EXPLAIN ANALYZE {table}: " + " | ".join(line.strip() for line in plan))


if __name__ == "__main__":
    main()
