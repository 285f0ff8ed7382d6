"""EXPLAIN (ANALYZE, BUFFERS) of every kind of search on a catalog, written to docs/search-plans.md.

    .venv/bin/python bench/explain_search.py [--data-dir /var/tmp/neuron-catalog-bench3] [--model synthetic-gpt2-xl]

Runs the same read-side functions the API routes call and explains each statement they send.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def search_kinds(m: str) -> dict[str, Callable[[Session], Any]]:
    """One representative call of each kind of search on catalog ``m``, as the API routes make them
    (also bench/part10_requests.py's list)."""
    from catalog.read import catalog, search, vectors

    S = search.SearchQuery
    return {
        "neuron detail": lambda s: catalog.neuron_record_json(s, m, 20, 7),
        "filter + sort (layers 20-29, alignment >= 0.1, by -activation_max)":
            lambda s: search.search_json(s, m, S(layer_min=20, layer_max=29, ranges=(("alignment", "min", 0.1),),
                                            sort="-activation_max")),
        "pattern, rare word (q=walrus)": lambda s: search.search_json(s, m, S(q="walrus")),
        "pattern, common word (q=the)": lambda s: search.search_json(s, m, S(q="the")),
        "pattern, phrase (q=\"a person\")": lambda s: search.search_json(s, m, S(q='"a person"')),
        "pattern, phrase and exclusion (q=\"a person\" -who)": lambda s: search.search_json(s, m, S(q='"a person" -who')),
        "promoted token (token=id:1000)": lambda s: search.search_json(s, m, S(token="id:1000")),
        "trigger token (trigger_token=id:1000)": lambda s: search.search_json(s, m, S(trigger_token="id:1000")),
        "next token (next_token=id:1000)": lambda s: search.search_json(s, m, S(next_token="id:1000")),
        "token ranking (id:1000, k=50)": lambda s: vectors.token_ranking(s, m, "id:1000", k=50),
        "similar neurons (20/7, key space)": lambda s: vectors.similar(s, m, 20, 7, space="key", k=20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/var/tmp/neuron-catalog-bench3"))
    ap.add_argument("--model", default="synthetic-gpt2-xl")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "search-plans.md")
    args = ap.parse_args()
    os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)

    from catalog.api.deps import api_engine
    from catalog.read.explain import plans

    m = args.model
    kinds = search_kinds(m)
    engine = api_engine()  # the routes' connection settings
    lines = [
        "# How each kind of search is served",
        "",
        (f"`EXPLAIN (ANALYZE, BUFFERS)` of the statements the read side sends for each kind of request, on the "
        f"catalog `{m}` (bench/part3_search.py: 307,200 neurons, 15.4M triggers), {datetime.now(UTC):%Y-%m-%d}, "
        f"{platform.node()} ({os.cpu_count()} CPUs), on the API's connection settings. Produced by `bench/explain_search.py`; the tests check "
         "the same on a tiny catalog with sequential scans disabled (`tests/test_search_plans.py`)."),
        "",
    ]
    for title, call in kinds.items():
        lines += [f"## {title}", ""]
        for statement, plan in plans(engine, call):
            first = " ".join(statement.split())[:160]
            plan = re.sub(r"'\[[^\]]{200,}\]'", "'[... the query vector ...]'", plan)
            lines += [f"`{first}...`", "", "```", plan, "```", ""]
        print("explained", title, flush=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
