"""A catalog entry's current run written out: one record per neuron (JSONL or Parquet), or its layers.

The records are those of :func:`catalog.read.catalog.records`, shared with the API; a whole run is
read as columns (:mod:`catalog.read.bulk`) and written from them.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.orm import Session

from catalog.read.bulk import TOKEN_LISTS, LayerColumns, run_columns
from catalog.read.catalog import NEURON_FIELDS, clean, layer_summaries, records
from catalog.vocab import ABLATIONS, LABELS, NEURON_FIGURES

__all__ = ["ExportError", "export", "export_layers", "flat_layer_rows", "parquet_schema", "records"]

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
T = TypeVar("T")


class ExportError(ValueError):
    pass


def export(session: Session, name: str, out: Path, *, vectors: bool = False) -> int:
    """Write the records to ``out`` (format from its suffix); returns how many were written.

    The records are :func:`records`' (a test holds the files equal to that), built here from one layer's
    columns at a time (:mod:`catalog.read.bulk`): thousands of neurons a second where dicts and
    ``json.dumps`` manage a few hundred.
    """
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ExportError(f"cannot export to {out}: the file name must end in .jsonl or .parquet")
    if not out.parent.exists():
        raise ExportError(f"cannot export to {out}: directory {out.parent} does not exist")
    entry, run, names, columns = run_columns(session, name, vectors=vectors, json=fmt == "jsonl")
    layers = prefetched(columns)
    tmp = out.with_name(out.name + ".partial")
    count = 0
    try:
        if fmt == "jsonl":
            encoder = _JsonEncoder(name, int(run.id), names, gated=entry.gated, causal=entry.causal)
            with tmp.open("w", encoding="utf-8") as f:
                for cols in layers:
                    lines = encoder.lines(cols, vectors=vectors)
                    f.writelines(lines)
                    count += len(lines)
        else:
            import pyarrow.parquet as pq

            schema = parquet_schema(vectors=vectors)
            builder = _ArrowBuilder(name, int(run.id), names, schema, gated=entry.gated, causal=entry.causal)
            with pq.ParquetWriter(tmp, schema) as writer:
                count = _write_row_groups(writer, (builder.table(cols, vectors=vectors) for cols in layers))
        tmp.replace(out)  # a failed export never leaves a half-written file under the real name
    finally:
        layers.close()
        tmp.unlink(missing_ok=True)
    return count


def prefetched(items: Iterator[T]) -> Generator[T, None, None]:
    """``items``, each produced one ahead in a thread: Postgres works on the next layer while this one
    is encoded (two cores: about the time of the slower of the two instead of their sum). The thread
    alone advances ``items`` (and closes it), so a session behind them is used by one thread at a time."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                box.put(("end", None))
        except Exception as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
            box.put(("error", exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="export-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while worker.is_alive():  # let a producer blocked on a full box finish
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


ROW_GROUP = 2048  # records per Parquet row group


def _write_row_groups(writer: Any, tables: Iterator[Any]) -> int:
    """Write the tables' rows in row groups of ROW_GROUP (the last one shorter); returns the row count."""
    import pyarrow as pa

    pending: list[Any] = []
    held = count = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        count += table.num_rows
        if held >= ROW_GROUP:
            joined = pa.concat_tables(pending)
            full = held - held % ROW_GROUP
            writer.write_table(joined.slice(0, full), row_group_size=ROW_GROUP)
            pending, held = [joined.slice(full)], held - full
    if held or not count:
        writer.write_table(pa.concat_tables(pending) if pending else writer.schema.empty_table())
    return count


# --- JSONL --------------------------------------------------------------------------------------------

_encode_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) writes for a str
_NOT_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # json.dumps' spellings


def json_str(s: str | None) -> str:
    return "null" if s is None else _encode_str(s)


def json_floats(values: np.ndarray) -> list[str]:
    """Each float as json.dumps writes it (``float.__repr__``, slow: the vectors only; the layer's
    columns come spelled by Postgres, catalog.read.bulk.json_float_sql)."""
    out = list(map(float.__repr__, values.astype(np.float64, copy=False).tolist()))
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = _NOT_FINITE[out[i]]
    return out


class _TokenHeads(dict[int, str]):
    """Token id -> the start of its JSON object in a value-token list, up to the logit; made on first use."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names

    def __missing__(self, tid: int) -> str:
        head = self[tid] = f'{{"token_id": {tid}, "token": {json_str(self.names.get(tid))}, "logit": '
        return head


class _JsonEncoder:
    """A layer's columns as JSONL lines, each ``json.dumps(record, ensure_ascii=False)`` of records()."""

    def __init__(self, name: str, run_id: int, names: dict[int, str], *, gated: bool, causal: bool) -> None:
        self.name, self.run_id, self.names, self.gated, self.causal = name, run_id, names, gated, causal
        self.token_heads = _TokenHeads(names)

    def _triggers(self, cols: LayerColumns) -> tuple[list[str], np.ndarray]:
        """Every trigger's JSON object, and which have a next token. A prefix is written once for all
        the triggers that share it, as the text before the activation and the text after it."""
        heads = [f'{{"document": {d}, "position": {p}, "text": {json_str(t)}, "activation": '
                 for d, p, t in zip(cols.prefix_document, cols.prefix_position, cols.prefix_text, strict=True)]
        tails = [f', "next_token_id": {"null" if n is None else n}, "next_token": '
                 f'{"null" if n is None else json_str(self.names.get(n))}, "text_after": {json_str(a)}'
                 for n, a in zip(cols.prefix_next_token, cols.prefix_text_after, strict=True)]
        assert cols.activation_json is not None and cols.ablations_json is not None
        t = cols.triggers
        ends = np.full(len(t), "}", dtype=object)
        ab = cols.ablations_json  # three per positive trigger, in order
        ends[t["sign"] > 0] = [f', "without_last": {a}, "without_first": {b}, "without_random": {c}}}'
                               for a, b, c in zip(ab[0::3], ab[1::3], ab[2::3], strict=True)]
        items = [heads[p] + a + tails[p] + e
                 for p, a, e in zip(cols.prefix.tolist(), cols.activation_json, ends.tolist(), strict=True)]
        has_next = np.array([n is not None for n in cols.prefix_next_token], dtype=bool)[cols.prefix]
        return items, has_next

    def lines(self, cols: LayerColumns, *, vectors: bool) -> list[str]:
        tok, trig = cols.bounds()
        heads = self.token_heads
        assert cols.logit_json is not None
        tokens = [heads[i] + x + "}" for i, x in zip(cols.tokens["token_id"].tolist(), cols.logit_json, strict=True)]
        triggers, has_next = self._triggers(cols)
        # agreement_triggers: the positive triggers with a next token (an encoder's: all of them)
        counted = np.concatenate([[0], np.cumsum(has_next if self.causal else np.ones(len(has_next), bool))])
        agreement = (counted[trig[:, 1]] - counted[trig[:, 0]]).tolist()
        n_fields = len(NEURON_FIELDS)
        out = []
        for i, row in enumerate(cols.neurons):
            rec: dict[str, Any] = {"model": self.name, "run_id": self.run_id, "layer": cols.layer, "neuron": row[0]}
            rec.update({f: clean(v) for f, v in zip(NEURON_FIELDS, row[1 : 1 + n_fields], strict=True)})
            parts = [json.dumps(rec, ensure_ascii=False)[:-1], f', "agreement_triggers": {agreement[i]}']
            for key, code in _TOKEN_KEYS:
                parts.append(f', "{key}": [{", ".join(tokens[tok[i, code] : tok[i, code + 1]])}]')
            parts.append(f', "triggers": [{", ".join(triggers[trig[i, 0] : trig[i, 1]])}]')
            if self.gated:
                parts.append(f', "negative_triggers": [{", ".join(triggers[trig[i, 1] : trig[i, 2]])}]')
            if vectors:
                for key, v in zip(("key_vector", "value_vector", "up_vector"), row[-3:], strict=True):
                    if v is not None or key != "up_vector":
                        parts.append(f', "{key}": [{", ".join(json_floats(np.asarray(v, dtype=np.float64)))}]')
            parts.append("}\n")
            out.append("".join(parts))
        return out


# (record key, list code of catalog.read.bulk.TOKEN_LISTS) in the records' key order
_TOKEN_KEYS = tuple((k, TOKEN_LISTS.index(k)) for k in
                    ("value_top_tokens", "value_bottom_tokens", "value_top_tokens_folded", "value_bottom_tokens_folded"))


# --- Parquet ------------------------------------------------------------------------------------------


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row indices of the ranges ``starts[i]:ends[i]`` one after the other, and their list offsets."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return index.astype(np.int64), offsets


class _ArrowBuilder:
    """A layer's columns as an Arrow table of ``parquet_schema``: what ``Table.from_pylist(records)`` gives."""

    def __init__(self, name: str, run_id: int, names: dict[int, str], schema: Any, *, gated: bool,
                 causal: bool) -> None:
        import pyarrow as pa

        self.name, self.run_id, self.schema, self.gated, self.causal = name, run_id, schema, gated, causal
        size = max(names, default=-1) + 1
        self.names = pa.array([names.get(i) for i in range(size)], pa.string())  # by token id

    def _token_text(self, ids: np.ndarray) -> Any:
        import pyarrow as pa

        known = (ids >= 0) & (ids < len(self.names))
        return self.names.take(pa.array(np.where(known, ids, 0), mask=~known))

    def table(self, cols: LayerColumns, *, vectors: bool) -> Any:
        import pyarrow as pa

        schema = self.schema
        n = len(cols.neurons)
        tok, trig = cols.bounds()
        arrays: dict[str, Any] = {
            "model": pa.array([self.name] * n, pa.string()), "run_id": pa.array([self.run_id] * n, pa.int64()),
            "layer": pa.array([cols.layer] * n, pa.int64()),
            "neuron": pa.array([row[0] for row in cols.neurons], pa.int64()),
        }
        for k, f in enumerate(NEURON_FIELDS, start=1):
            arrays[f] = pa.array([clean(row[k]) for row in cols.neurons], schema.field(f).type)

        token_type = schema.field("value_top_tokens").type.value_type
        t = cols.tokens
        for key, code in _TOKEN_KEYS:
            index, offsets = _ranges(tok[:, code], tok[:, code + 1])
            ids = t["token_id"][index].astype(np.int64)
            values = pa.StructArray.from_arrays(
                [pa.array(ids), self._token_text(ids), pa.array(t["logit"][index])], fields=list(token_type))
            arrays[key] = pa.ListArray.from_arrays(pa.array(offsets), values)

        trigger_type = schema.field("triggers").type.value_type
        g = cols.triggers
        next_token = pa.array(cols.prefix_next_token, pa.int64())
        has_next = next_token.is_valid().to_numpy(zero_copy_only=False)[cols.prefix]
        for key, lo, hi in (("triggers", 0, 1), ("negative_triggers", 1, 2)):
            if key == "negative_triggers" and not self.gated:
                arrays[key] = pa.nulls(n, schema.field(key).type)  # records() has no such key
                continue
            index, offsets = _ranges(trig[:, lo], trig[:, hi])
            prefix = pa.array(cols.prefix[index])
            nxt = next_token.take(prefix)
            nxt_ids = nxt.fill_null(-1).to_numpy()
            fields: dict[str, Any] = {
                "document": pa.array(g["document"][index]), "position": pa.array(g["position"][index].astype(np.int64)),
                "text": pa.array(cols.prefix_text, pa.string()).take(prefix),
                "activation": pa.array(g["coefficient"][index]), "next_token_id": nxt,
                "next_token": self._token_text(nxt_ids),
                "text_after": pa.array(cols.prefix_text_after, pa.string()).take(prefix),
            }
            for a in ABLATIONS:
                w = g[f"without_{a}"][index]
                # a positive trigger's ablations are cleaned (NaN -> null); a negative one has none
                fields[f"without_{a}"] = (pa.array(w, mask=np.isnan(w)) if key == "triggers"
                                          else pa.nulls(len(index), pa.float64()))
            values = pa.StructArray.from_arrays([fields[f.name] for f in trigger_type], fields=list(trigger_type))
            arrays[key] = pa.ListArray.from_arrays(pa.array(offsets), values)
            if key == "triggers":
                counted = np.concatenate([[0], np.cumsum(has_next[index] if self.causal
                                                         else np.ones(len(index), bool))])
                arrays["agreement_triggers"] = pa.array(counted[offsets[1:]] - counted[offsets[:-1]], pa.int64())

        if vectors:
            for k, key in enumerate(("key_vector", "value_vector", "up_vector")):
                arrays[key] = pa.array([None if row[-3 + k] is None else np.asarray(row[-3 + k], dtype=np.float32)
                                        for row in cols.neurons], schema.field(key).type)
        return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


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
