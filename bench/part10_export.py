"""Part 10 benchmark: `neuron-catalog export` of a whole catalog against COPY ... TO STDOUT of the same rows.

    .venv/bin/python bench/part10_export.py [--tokens 20000] [--data-dir DIR] [--reuse] [--old-layers 1]

Builds a SmolLM2 catalog over the first ``--tokens`` tokens of ``data/wordnet.txt`` (the demo's; about
15 minutes of CPU at 20,000 tokens on 2 cores) in a fresh embedded Postgres under a temporary data
directory, or under ``--data-dir``; ``--reuse`` takes the catalog ``--name`` already there instead.

Printed, all from this one run (each figure from a warm cache: one untimed COPY pass reads every table first):
- JSONL and Parquet export: seconds, neurons/s, file size, peak RSS of this process during that export
  (and its RSS before them);
- raw ``COPY (SELECT ...) TO STDOUT`` of the same rows (neurons with their figures, value tokens with
  their text, triggers with their prefix and next token), read and thrown away: neurons/s;
- the exports' time as a ratio to that COPY;
- the previous export path (records() + json.dumps) over ``--old-layers`` layers, for the neurons/s it had;
- with ``--explain``: EXPLAIN ANALYZE of every per-layer and per-neuron read that joins triggers to
  prefixes (records() of a layer and of a neuron, the API's neuron JSON, a search page's summaries with
  and without a pattern, the review page's trigger tokens, the annotation check, the export's own reads),
  one line each: the plan's first two nodes and its execution time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The rows behind the records, whole run, one statement per table (what a database-side dump reads).
COPY_SQL = {
    "neurons": "SELECT n.* FROM neurons n WHERE n.run_id = {run} ORDER BY n.layer, n.neuron",
    "value_tokens": """SELECT vt.layer, vt.neuron, vt.convention, vt.kind, vt.rank, vt.token_id, t.text, vt.logit
                       FROM value_tokens vt LEFT JOIN tokens t ON t.run_id = vt.run_id AND t.token_id = vt.token_id
                       WHERE vt.run_id = {run} ORDER BY vt.layer, vt.neuron, vt.convention, vt.kind, vt.rank""",
    "triggers": """SELECT tr.layer, tr.neuron, tr.sign, tr.rank, tr.document, tr.position, p.text, tr.coefficient,
                          p.next_token_id, nt.text, p.text_after, tr.coefficient_without_last,
                          tr.coefficient_without_first, tr.coefficient_without_random
                   FROM triggers tr
                   JOIN prefixes p ON p.run_id = tr.run_id AND p.document = tr.document AND p.position = tr.position
                   LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
                   WHERE tr.run_id = {run} ORDER BY tr.layer, tr.neuron, tr.sign DESC, tr.rank""",
}
VECTOR_COLUMNS = ("key_vector", "value_vector", "up_vector")


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so each export's peak is its own
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def copy_out(engine: object, run_id: int) -> tuple[float, int]:
    """Seconds and bytes of COPY ... TO STDOUT (text) of the records' rows, read and thrown away."""
    from sqlalchemy import Engine

    assert isinstance(engine, Engine)
    total = 0
    t0 = time.perf_counter()
    with engine.connect() as conn:
        dbapi = conn.connection.driver_connection
        assert dbapi is not None
        with dbapi.cursor() as cur:
            for sql in COPY_SQL.values():
                cols = sql.format(run=run_id)
                if cols.startswith("SELECT n.*"):  # every column but the vectors (the exports leave them out)
                    cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                "current_schema() AND table_name = 'neurons' ORDER BY ordinal_position")
                    keep = [c for (c,) in cur.fetchall() if c not in VECTOR_COLUMNS]
                    cols = cols.replace("n.*", ", ".join(f"n.{c}" for c in keep))
                with cur.copy(f"COPY ({cols}) TO STDOUT") as cp:
                    for chunk in cp:
                        total += len(chunk)
        conn.rollback()
    return time.perf_counter() - t0, total


def summary(plan: str) -> str:
    """The plan's first two nodes and its execution time, on one line."""
    lines = [ln.strip().removeprefix("->").strip() for ln in plan.splitlines()]
    nodes = [ln.split("  (")[0] for ln in lines if "(cost=" in ln or "(actual" in ln][:2]
    took = next((ln for ln in lines if ln.startswith("Execution Time")), "")
    return f"{' / '.join(nodes)}  [{took}]"


def explain(engine: object, name: str, run_id: int, layer: int) -> None:
    """EXPLAIN ANALYZE of each read that joins triggers to prefixes, one line per statement."""
    from sqlalchemy import Engine, select
    from sqlalchemy.orm import Session

    from catalog.annotations.schemas import AnnotationWrite
    from catalog.annotations.service import _check_write
    from catalog.read import bulk, catalog, search
    from catalog.read.catalog import require_run
    from catalog.read.explain import plans
    from catalog.store.models import Trigger
    from catalog.ui.pages import _trigger_tokens

    assert isinstance(engine, Engine)
    neuron = 7
    with Session(engine) as s:
        trig = [{"document": d, "position": p} for d, p in s.execute(
            select(Trigger.document, Trigger.position).where(Trigger.run_id == run_id, Trigger.layer == layer,
                                                              Trigger.neuron == neuron)).tuples()]
    S = search.SearchQuery
    calls = {
        f"records(), layer {layer}": lambda s: list(catalog.records(s, name, layers=[layer])),
        f"records(), neuron {layer}/{neuron} (show, API neuron)":
            lambda s: list(catalog.records(s, name, layers=[layer], neurons=[neuron])),
        f"neuron_record_json {layer}/{neuron} (API neuron route)":
            lambda s: catalog.neuron_record_json(s, name, layer, neuron),
        "search page summaries (layers 20-29, 50 neurons)": lambda s: search.search(s, name, S(layer_min=20)),
        "search_json page (layers 20-29)": lambda s: search.search_json(s, name, S(layer_min=20)),
        "search page with a pattern (q=water)": lambda s: search.search(s, name, S(q="water")),
        "search_json with a pattern (q=water)": lambda s: search.search_json(s, name, S(q="water")),
        "search by relevance (q=water)": lambda s: search.search_json(s, name, S(q="water", sort="relevance")),
        f"review page trigger tokens {layer}/{neuron}":
            lambda s: _trigger_tokens(s, run_id, trig),  # type: ignore[arg-type]
        f"annotation examples check {layer}/{neuron}": lambda s: _check_write(
            s, require_run(s, name)[1], layer, neuron,
            AnnotationWrite.model_validate({"label": "semantic", "description": "x", "examples": trig[:2]})),
    }
    for title, call in calls.items():
        print(f"\n{title}")
        for statement, plan in plans(engine, call):
            print(f"  {' '.join(statement.split())[:90]}...\n    {summary(plan)}")
    print("\nexport (catalog.read.bulk), layer", layer)
    with engine.connect() as conn:
        params = {"run": run_id, "layer": layer}
        for sql in (bulk._layer_sql("value_tokens", True), bulk._layer_sql("triggers", True), bulk._PREFIXES_SQL):
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).all())
            print(f"  {' '.join(sql.split())[:90]}...\n    {summary(plan)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000, help="corpus tokens of the catalog built (default 20000)")
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--name", default="bench-part10")
    ap.add_argument("--data-dir", type=Path, default=None, help="CATALOG_DATA_DIR (default: a fresh temp dir)")
    ap.add_argument("--reuse", action="store_true", help="export the catalog --name already in --data-dir")
    ap.add_argument("--old-layers", type=int, default=1, help="layers to time on the previous path (0: skip)")
    ap.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the read queries, then stop")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the files go (default: a temp dir)")
    args = ap.parse_args()
    tmp = None
    if args.data_dir is not None:
        os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    elif args.reuse:
        sys.exit("--reuse needs --data-dir")
    elif "CATALOG_DATABASE_URL" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="nc-bench10-")
        os.environ["CATALOG_DATA_DIR"] = tmp.name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from sqlalchemy.orm import Session

    from catalog.export import export, records
    from catalog.read.catalog import require_run
    from catalog.store import migrate
    from catalog.store.database import get_engine, stop_embedded

    print(f"# part 10 benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs",
          flush=True)
    migrate.upgrade(None)
    engine = get_engine()
    if not args.reuse:
        from catalog.runs.local import extract
        from catalog.runs.schemas import ExtractRequest

        t0 = time.perf_counter()
        extract(ExtractRequest(model="smollm2", name=args.name, corpus=str(args.corpus), max_tokens=args.tokens),
                engine=engine)
        print(f"built {args.name}: SmolLM2 over {args.tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    with Session(engine) as s:
        entry, run = require_run(s, args.name)
        run_id, n_neurons = int(run.id), entry.n_layers * entry.d_mlp
    print(f"catalog {args.name}: run {run_id}, {entry.n_layers} layers x {entry.d_mlp} = {n_neurons} neurons")

    if args.explain:
        explain(engine, args.name, run_id, entry.n_layers // 2)
        stop_embedded()
        return
    out_tmp = tempfile.TemporaryDirectory(prefix="nc-bench10-out-") if args.out_dir is None else None
    out_dir = args.out_dir or Path(out_tmp.name)  # type: ignore[union-attr]
    copy_out(engine, run_id)  # warm-up: every table read once, so no figure pays for a cold cache
    copy_s, copy_bytes = copy_out(engine, run_id)
    results: dict[str, tuple[float, int, float]] = {}
    base_rss = rss_mb("VmRSS")
    for suffix in (".jsonl", ".parquet"):
        out = out_dir / f"export{suffix}"
        reset_peak_rss()
        t0 = time.perf_counter()
        with Session(engine) as s:
            n = export(s, args.name, out)
        results[suffix] = (time.perf_counter() - t0, out.stat().st_size, rss_mb())
        assert n == n_neurons, (n, n_neurons)

    print(f"\nRSS before the exports {base_rss:.0f} MB (the interpreter and its libraries)")
    print(f"\n{'':<34}{'seconds':>9}{'neurons/s':>11}{'x COPY':>8}{'MB':>8}{'peak RSS MB':>13}")
    print(f"{'COPY ... TO STDOUT (same rows)':<34}{copy_s:9.1f}{n_neurons / copy_s:11.0f}{1.0:8.2f}"
          f"{copy_bytes / 1e6:8.0f}")
    for suffix, (secs, size, rss) in results.items():
        print(f"{'export ' + suffix[1:]:<34}{secs:9.1f}{n_neurons / secs:11.0f}{secs / copy_s:8.2f}"
              f"{size / 1e6:8.0f}{rss:13.0f}")
    if args.old_layers:
        layers = list(range(min(args.old_layers, entry.n_layers)))
        reset_peak_rss()
        t0 = time.perf_counter()
        with Session(engine) as s, (out_dir / "old.jsonl").open("w", encoding="utf-8") as f:
            count = 0
            for rec in records(s, args.name, layers=layers):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                count += 1
        secs = time.perf_counter() - t0
        print(f"{f'previous path, {len(layers)} layer(s), jsonl':<34}{secs:9.1f}{count / secs:11.0f}"
              f"{secs / count * n_neurons / copy_s:8.2f}{'':>8}{rss_mb():13.0f}")
    if out_tmp is not None:
        out_tmp.cleanup()
    stop_embedded()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
