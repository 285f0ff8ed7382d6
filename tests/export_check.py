"""The check that ``export`` writes what :func:`catalog.read.catalog.records` gives, shared by the test
modules that build catalogs: the JSONL file byte for byte as ``json.dumps(record, ensure_ascii=False)``
writes each record, the Parquet file the table that ``pyarrow.Table.from_pylist(records)`` makes (both
what the export wrote before it read columns)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from catalog.export import export, parquet_schema, records


def _nan_free(v: Any) -> Any:
    """NaN as a marker string, so that == compares two NaNs as equal."""
    if isinstance(v, float) and math.isnan(v):
        return "<NaN>"
    if isinstance(v, dict):
        return {k: _nan_free(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_free(x) for x in v]
    return v


def assert_export_equals_records(session: Session, name: str, out: Path, *, vectors: bool) -> None:
    want = list(records(session, name, vectors=vectors))
    assert export(session, name, out, vectors=vectors) == len(want)
    if out.suffix == ".jsonl":
        got = out.read_text(encoding="utf-8")
        assert got == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in want)
    else:
        table = pq.read_table(out)
        reference = pa.Table.from_pylist(want, schema=parquet_schema(vectors=vectors))
        assert table.schema == reference.schema
        assert _nan_free(table.to_pylist()) == _nan_free(reference.to_pylist())
