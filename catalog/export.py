"""A catalog entry's current run as one record per neuron, written to JSONL or Parquet.

Records are read layer by layer (three queries per layer) so memory stays bounded by one layer.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from catalog.service import current_run
from catalog.store.models import Layer, Neuron, Prefix, Token, Trigger, ValueToken

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}

NEURON_FIELDS = (
    "key_norm", "value_norm", "bias", "alignment", "up_norm", "up_alignment",
    "activation_mean", "activation_std", "activation_positive_fraction", "activation_max",
    "agreement", "next_token_mean_rank", "ablation_last", "ablation_first", "ablation_random", "suggested_label",
)


class ExportError(ValueError):
    pass


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def records(
    session: Session, name: str, *, vectors: bool = False,
    layers: list[int] | None = None, neurons: list[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of ``name``'s current run, by layer then neuron (optionally only some of them)."""
    found = current_run(session, name)
    if found is None:
        raise ExportError(f"no completed catalog named {name!r} (see `neuron-catalog runs`)")
    entry, run = found
    rid = run.id
    vocab = dict(session.execute(select(Token.token_id, Token.text).where(Token.run_id == rid)).tuples().all())
    for layer in (range(entry.n_layers) if layers is None else [x for x in layers if 0 <= x < entry.n_layers]):
        only = (lambda col: col.in_(neurons)) if neurons is not None else (lambda col: true())
        tokens: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {"top": [], "bottom": []})
        for n, kind, tid, logit in session.execute(
            select(ValueToken.neuron, ValueToken.kind, ValueToken.token_id, ValueToken.logit)
            .where(ValueToken.run_id == rid, ValueToken.layer == layer, only(ValueToken.neuron))
            .order_by(ValueToken.neuron, ValueToken.kind, ValueToken.rank)
        ).tuples():
            tokens[n][kind].append({"token_id": tid, "token": vocab.get(tid), "logit": logit})
        triggers: dict[int, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: {1: [], -1: []})
        for n, sign, doc, pos, coef, wl, wf, wr, txt, nxt in session.execute(
            select(
                Trigger.neuron, Trigger.sign, Trigger.document, Trigger.position, Trigger.coefficient,
                Trigger.coefficient_without_last, Trigger.coefficient_without_first,
                Trigger.coefficient_without_random, Prefix.text, Prefix.next_token_id,
            )
            .join(Prefix, (Prefix.run_id == Trigger.run_id) & (Prefix.document == Trigger.document)
                  & (Prefix.position == Trigger.position))
            .where(Trigger.run_id == rid, Trigger.layer == layer, only(Trigger.neuron))
            .order_by(Trigger.neuron, Trigger.sign.desc(), Trigger.rank)
        ).tuples():
            item: dict[str, Any] = {"document": doc, "position": pos, "text": txt, "activation": coef,
                                    "next_token_id": nxt, "next_token": vocab.get(nxt) if nxt is not None else None}
            if sign > 0:
                item.update(without_last=_clean(wl), without_first=_clean(wf), without_random=_clean(wr))
            triggers[n][sign].append(item)
        cols = [Neuron.neuron, *(getattr(Neuron, f) for f in NEURON_FIELDS)]
        if vectors:
            cols += [Neuron.key_vector, Neuron.value_vector]
        for row in session.execute(
            select(*cols).where(Neuron.run_id == rid, Neuron.layer == layer, only(Neuron.neuron)).order_by(Neuron.neuron)
        ).tuples():
            n = row[0]
            rec: dict[str, Any] = {"model": name, "run_id": rid, "layer": layer, "neuron": n}
            rec.update({f: _clean(v) for f, v in zip(NEURON_FIELDS, row[1 : 1 + len(NEURON_FIELDS)], strict=True)})
            rec["value_top_tokens"] = tokens[n]["top"]
            rec["value_bottom_tokens"] = tokens[n]["bottom"]
            rec["triggers"] = triggers[n][1]
            if entry.gated:
                rec["negative_triggers"] = triggers[n][-1]
            if vectors:
                # pgvector's SQLAlchemy type returns a list (numpy array in older versions)
                rec["key_vector"] = [float(x) for x in row[-2]]
                rec["value_vector"] = [float(x) for x in row[-1]]
            yield rec


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
    ])
    fields = [("model", pa.string()), ("run_id", pa.int64()), ("layer", pa.int64()), ("neuron", pa.int64())]
    fields += [(f, pa.string() if f == "suggested_label" else pa.float64()) for f in NEURON_FIELDS]
    fields += [("value_top_tokens", pa.list_(token)), ("value_bottom_tokens", pa.list_(token)),
               ("triggers", pa.list_(trigger)), ("negative_triggers", pa.list_(trigger))]
    if vectors:
        fields += [("key_vector", pa.list_(pa.float32())), ("value_vector", pa.list_(pa.float32()))]
    return pa.schema(fields)


LAYER_FIELDS = (
    "mean_bias", "mean_alignment", "corr_bias_key_norm", "corr_bias_value_norm", "corr_bias_alignment",
    "bias_alignment_slope", "bias_alignment_intercept", "key_cosine_mean", "value_cosine_mean",
    "mean_agreement", "mean_ablation_last", "mean_ablation_first", "mean_ablation_random",
)
LABELS = ("shallow", "semantic", "shallow+semantic")


def layer_summaries(session: Session, name: str, *, histograms: bool = False) -> list[dict[str, Any]]:
    """One row per layer of ``name``'s current run: seed 000 and seed 001 figures, label counts."""
    found = current_run(session, name)
    if found is None:
        raise ExportError(f"no completed catalog named {name!r} (see `neuron-catalog runs`)")
    _, run = found
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for index, label, n in session.execute(
        select(Neuron.layer, Neuron.suggested_label, func.count())
        .where(Neuron.run_id == run.id, Neuron.suggested_label.is_not(None))
        .group_by(Neuron.layer, Neuron.suggested_label)
    ).tuples():
        counts[index][str(label)] = n
    rows = []
    for stored in session.scalars(select(Layer).where(Layer.run_id == run.id).order_by(Layer.layer)):
        row: dict[str, Any] = {"model": name, "run_id": run.id, "layer": stored.layer}
        row.update({f: _clean(getattr(stored, f)) for f in LAYER_FIELDS})
        row.update({f"labels_{k}": counts[stored.layer].get(k, 0) for k in LABELS})
        if histograms:
            row["histograms"] = stored.histograms
        rows.append(row)
    return rows


LAYER_FORMATS = (".jsonl", ".csv")


def export_layers(session: Session, name: str, out: Path) -> int:
    """Write ``layer_summaries`` to .jsonl (histograms included) or .csv; returns the row count."""
    import csv

    suffix = out.suffix.lower()
    if suffix not in LAYER_FORMATS:
        raise ExportError(f"cannot write {out}: the file name must end in .jsonl or .csv")
    rows = layer_summaries(session, name, histograms=suffix == ".jsonl")
    with out.open("w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)
