"""A catalog entry's current run written out: one record per neuron (JSONL or Parquet), or its layers.

The records themselves come from :mod:`catalog.read.catalog`, shared with the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from catalog.read.catalog import layer_summaries, records
from catalog.vocab import LABELS, NEURON_FIGURES

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


class ExportError(ValueError):
    pass


def export(session: Session, name: str, out: Path, *, vectors: bool = False) -> int:
    """Write the records to ``out`` (format from its suffix); returns how many were written."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ExportError(f"cannot export to {out}: the file name must end in .jsonl or .parquet")
    if not out.parent.exists():
        raise ExportError(f"cannot export to {out}: directory {out.parent} does not exist")
    rows = records(session, name, vectors=vectors)
    tmp = out.with_name(out.name + ".partial")
    count = 0
    try:
        if fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for rec in rows:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    count += 1
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema(vectors=vectors)
            batch: list[dict[str, Any]] = []
            with pq.ParquetWriter(tmp, schema) as writer:
                for rec in rows:
                    batch.append(rec)
                    count += 1
                    if len(batch) >= 2048:
                        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                        batch = []
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        tmp.replace(out)  # a failed export never leaves a half-written file under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return count


def parquet_schema(*, vectors: bool) -> Any:
    import pyarrow as pa

    token = pa.struct([("token_id", pa.int64()), ("token", pa.string()), ("logit", pa.float64())])
    trigger = pa.struct([
        ("document", pa.int64()), ("position", pa.int64()), ("text", pa.string()), ("activation", pa.float64()),
        ("next_token_id", pa.int64()), ("next_token", pa.string()),
        ("without_last", pa.float64()), ("without_first", pa.float64()), ("without_random", pa.float64()),
        ("text_after", pa.string()),
    ])
    fields = [("model", pa.string()), ("run_id", pa.int64()), ("layer", pa.int64()), ("neuron", pa.int64())]
    # every figure of catalog.vocab in its order; numeric figures are float64 (label_triggers too, as
    # files written before the vocabulary have it), labels strings
    fields += [(f.name, pa.string() if f.type is str else pa.float64()) for f in NEURON_FIGURES]
    fields += [("agreement_triggers", pa.int64())]
    fields += [("value_top_tokens", pa.list_(token)), ("value_bottom_tokens", pa.list_(token)),
               ("value_top_tokens_folded", pa.list_(token)), ("value_bottom_tokens_folded", pa.list_(token)),
               ("triggers", pa.list_(trigger)), ("negative_triggers", pa.list_(trigger))]
    if vectors:
        fields += [("key_vector", pa.list_(pa.float32())), ("value_vector", pa.list_(pa.float32())),
                   ("up_vector", pa.list_(pa.float32()))]
    return pa.schema(fields)


def flat_layer_rows(session: Session, name: str, *, histograms: bool = False) -> list[dict[str, Any]]:
    """``layer_summaries`` with the label counts as ``labels_<label>`` columns (table and CSV friendly)."""
    rows = []
    for row in layer_summaries(session, name, histograms=histograms):
        counts = row.pop("label_counts")
        hist = row.pop("histograms", None)
        row.update({f"labels_{k}": counts.get(k, 0) for k in LABELS})
        if histograms:
            row["histograms"] = hist
        rows.append(row)
    return rows


LAYER_FORMATS = (".jsonl", ".csv")


def export_layers(session: Session, name: str, out: Path) -> int:
    """Write ``layer_summaries`` to .jsonl (histograms included) or .csv; returns the row count."""
    import csv

    suffix = out.suffix.lower()
    if suffix not in LAYER_FORMATS:
        raise ExportError(f"cannot write {out}: the file name must end in .jsonl or .csv")
    rows = flat_layer_rows(session, name, histograms=suffix == ".jsonl")
    with out.open("w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)
