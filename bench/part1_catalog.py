"""Part 1 benchmark: a weight-derived catalog of SmolLM2, stage by stage, and ingest next to raw COPY.

    .venv/bin/python bench/part1_catalog.py [--model smollm2] [--data-dir DIR]

Runs in a fresh embedded Postgres under a temporary data directory unless ``--data-dir`` or
``CATALOG_DATABASE_URL`` says otherwise, so that the size on disk is this catalog's alone.

Printed, all from this one run:
- wall time per stage as recorded on the run (load, weight statistics, token projections, ingest),
  and a second, cached load;
- peak RSS of this process;
- ingest rows/s, and rows/s of a raw binary COPY of the very same rows into the same tables (same
  indexes and constraints, inside a transaction that is rolled back): their ratio is the target
  (ingest within 1.5x of raw COPY);
- catalog size on disk per neuron (tables and indexes, measured before the raw COPY).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# Row tables in ingest order.
TABLES = ("tokens", "prefixes", "layers", "neurons", "value_tokens", "triggers")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", type=Path, default=None, help="CATALOG_DATA_DIR (default: a fresh temp dir)")
    args = ap.parse_args()
    tmp = None
    if args.data_dir is not None:
        os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    elif "CATALOG_DATABASE_URL" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="nc-bench1-")
        os.environ["CATALOG_DATA_DIR"] = tmp.name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers
    from sqlalchemy import text

    from catalog.loading import load
    from catalog.runs.local import extract
    from catalog.runs.schemas import ExtractRequest
    from catalog.store.database import get_engine, stop_embedded

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    name = "bench-part1"
    print(f"# part 1 benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}  "
          f"cuda {torch.cuda.is_available()}")
    t0 = time.perf_counter()
    summary = extract(ExtractRequest(model=args.model, name=name))
    wall = time.perf_counter() - t0
    t = summary.timings
    print(f"\nmodel {args.model}: {summary.n_layers} layers x {summary.d_mlp} neurons, extract wall {wall:.1f} s")
    for key in ("load", "weight_statistics", "token_projections", "hashes", "ingest"):
        if key in t:
            print(f"  {key:<20} {t[key]:8.2f} s")
    t1 = time.perf_counter()
    load(args.model)
    print(f"  {'load (cached)':<20} {time.perf_counter() - t1:8.2f} s")
    print(f"  peak RSS {peak_rss_mb():.0f} MB")

    engine = get_engine()
    run_id = summary.run_id
    rows = summary.counts["rows"]
    n_neurons = summary.n_layers * summary.d_mlp
    with engine.connect() as conn:
        sizes = {
            tb: int(conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": tb}).scalar_one())
            for tb in TABLES
        }
        total_rows = sum(rows.values()) + summary.n_layers
        ingest_s = t["ingest"]

        # Raw COPY: the same rows, read back as binary COPY payloads (untimed) with a fresh run id,
        # then written into the same tables (timed); rolled back afterwards.
        dbapi = conn.connection.driver_connection
        with dbapi.transaction(force_rollback=True), dbapi.cursor() as cur:
            cur.execute("INSERT INTO extraction_runs (model_id, status, parameters, projection_convention, timings, "
                        "progress) SELECT model_id, 'failed', parameters, projection_convention, timings, progress "
                        "FROM extraction_runs WHERE id = %s RETURNING id", (run_id,))
            new_id = cur.fetchone()[0]
            payloads: dict[str, tuple[str, bytes]] = {}
            for tb in TABLES:
                cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                            "AND table_name = %s ORDER BY ordinal_position", (tb,))
                cols = [c for (c,) in cur.fetchall()]
                select = ", ".join(f"{new_id}::int4" if c == "run_id" else c for c in cols)
                buf = bytearray()
                with cur.copy(f"COPY (SELECT {select} FROM {tb} WHERE run_id = {run_id}) TO STDOUT (FORMAT BINARY)") as cp:
                    for chunk in cp:
                        buf += chunk
                payloads[tb] = (", ".join(cols), bytes(buf))
            raw_s = 0.0
            for tb, (cols, data) in payloads.items():
                t2 = time.perf_counter()
                with cur.copy(f"COPY {tb} ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                    for i in range(0, len(data), 1 << 20):
                        cp.write(data[i : i + (1 << 20)])
                raw_s += time.perf_counter() - t2
            raw_bytes = sum(len(d) for _, d in payloads.values())

    print(f"\ningest: {total_rows} rows, {summary.counts['copy_bytes'] / 1e6:.0f} MB of COPY payload")
    print(f"  catalog ingest (encode + COPY)  {ingest_s:7.2f} s  {total_rows / ingest_s:10.0f} rows/s")
    print(f"  raw COPY of the same rows       {raw_s:7.2f} s  {total_rows / raw_s:10.0f} rows/s  ({raw_bytes / 1e6:.0f} MB)")
    print(f"  ratio ingest / raw COPY         {ingest_s / raw_s:7.2f}   (target <= 1.5)")
    total = sum(sizes.values())
    print(f"\non disk: {total / 1e6:.0f} MB for {n_neurons} neurons = {total / n_neurons / 1024:.1f} KiB per neuron")
    for tb, size in sizes.items():
        print(f"  {tb:<14} {size / 1e6:8.1f} MB  {rows.get(tb, summary.n_layers if tb == 'layers' else 0):>9} rows")
    stop_embedded()
    if tmp is not None:
        tmp.cleanup()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
