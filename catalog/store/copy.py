"""Postgres binary COPY payloads built with numpy, a whole column at a time.

Binary COPY rows are a field count then (length, bytes) per field, length -1 for NULL. Rows that
share which fields are NULL (and the value of each low-cardinality text field) have one fixed
layout, so each such group becomes one numpy structured array filled column-wise; this is what
keeps ingest of millions of trigger rows close to the speed of the COPY itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)

_FIXED = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "float4": ">f4", "float8": ">f8", "bool": "?"}
# One-dimensional arrays of a fixed-width type: values [rows, L], the same L for every row of a call.
_ARRAYS = {"int4[]": ("int4", 23), "float8[]": ("float8", 701)}  # element kind, element type OID


@dataclass
class Column:
    """One column: ``kind`` is a fixed-width Postgres type, ``vector`` (pgvector), ``label`` (short text)
    or ``int4[]`` / ``float8[]`` (one-dimensional arrays without nulls).

    values: [rows] (or [rows, dim] for vectors, [rows, L] for arrays: each row's array has L elements).
    Nulls: ``None`` values for labels; NaN for floats when ``nan_is_null``; an explicit ``null`` mask
    otherwise.
    """

    name: str
    kind: str
    values: np.ndarray | Sequence[str | None]
    null: np.ndarray | None = None
    nan_is_null: bool = True

    def null_mask(self, n: int) -> np.ndarray:
        if self.kind == "label":
            return np.array([v is None for v in self.values], dtype=bool)
        mask = np.zeros(n, dtype=bool) if self.null is None else np.asarray(self.null, dtype=bool).copy()
        values = np.asarray(self.values)
        if self.nan_is_null and values.dtype.kind == "f" and self.kind not in _ARRAYS:
            mask |= np.isnan(values) if values.ndim == 1 else np.isnan(values).any(axis=1)
        return mask


def _field_dtype(col: Column, null: bool, label: str | None) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = [(f"{col.name}__len", ">i4")]
    if null:
        return fields
    if col.kind == "vector":
        dim = np.asarray(col.values).shape[1]
        return fields + [(f"{col.name}__dim", ">i2"), (f"{col.name}__unused", ">i2"), (col.name, (">f4", (dim,)))]
    if col.kind == "label":
        return fields + [(col.name, f"S{len(label.encode())}")] if label else fields
    if col.kind in _ARRAYS:
        length = np.asarray(col.values).shape[1]
        head = [(f"{col.name}__ndim", ">i4"), (f"{col.name}__flags", ">i4"), (f"{col.name}__oid", ">i4")]
        if length == 0:
            return fields + head
        element = [("len", ">i4"), ("value", _FIXED[_ARRAYS[col.kind][0]])]
        return fields + head + [(f"{col.name}__size", ">i4"), (f"{col.name}__lbound", ">i4"),
                                (col.name, (element, (length,)))]
    return fields + [(col.name, _FIXED[col.kind])]


def _field_length(col: Column, null: bool, label: str | None) -> int:
    if null:
        return -1
    if col.kind == "vector":
        return 4 + 4 * np.asarray(col.values).shape[1]
    if col.kind == "label":
        return len(label.encode()) if label else 0
    if col.kind in _ARRAYS:
        length = np.asarray(col.values).shape[1]
        size = np.dtype(_FIXED[_ARRAYS[col.kind][0]]).itemsize
        return 12 + (8 + length * (4 + size) if length else 0)
    return np.dtype(_FIXED[col.kind]).itemsize


def encode(columns: Sequence[Column], *, header: bool = True, trailer: bool = True) -> bytes:
    """The binary COPY payload of the rows given column-wise (all columns the same length)."""
    n = len(columns[0].values)
    nulls = np.stack([c.null_mask(n) for c in columns], axis=1) if columns else np.zeros((n, 0), bool)
    labels = [c for c in columns if c.kind == "label"]
    label_codes = []
    label_values: list[list[str | None]] = []
    for c in labels:
        uniq = sorted({v for v in c.values if v is not None})
        code = {v: i for i, v in enumerate(uniq)}
        label_values.append([*uniq, None])
        label_codes.append(np.array([code[v] if v is not None else len(uniq) for v in c.values], dtype=np.int64))
    # One group per distinct (null pattern, label values).
    key = np.packbits(nulls, axis=1, bitorder="little") if nulls.shape[1] else np.zeros((n, 0), np.uint8)
    key_cols = [key.astype(np.int64)[:, i] for i in range(key.shape[1])] + label_codes
    parts = [HEADER] if header else []
    if n:
        stacked = np.stack(key_cols, axis=1) if key_cols else np.zeros((n, 1), np.int64)
        groups, inverse = np.unique(stacked, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for g in range(len(groups)):
            rows = np.nonzero(inverse == g)[0]
            first = rows[0]
            label_of = {c.name: label_values[i][label_codes[i][first]] for i, c in enumerate(labels)}
            null_of = {c.name: bool(nulls[first, j]) for j, c in enumerate(columns)}
            dtype = [("__count", ">i2")] + list(
                itertools.chain.from_iterable(_field_dtype(c, null_of[c.name], label_of.get(c.name)) for c in columns)
            )
            out = np.empty(len(rows), dtype=np.dtype(dtype))
            out["__count"] = len(columns)
            for c in columns:
                is_null, label = null_of[c.name], label_of.get(c.name)
                out[f"{c.name}__len"] = _field_length(c, is_null, label)
                if is_null:
                    continue
                if c.kind == "vector":
                    out[f"{c.name}__dim"] = np.asarray(c.values).shape[1]
                    out[f"{c.name}__unused"] = 0
                    out[c.name] = np.asarray(c.values)[rows]
                elif c.kind == "label":
                    if label:
                        out[c.name] = label.encode()
                elif c.kind in _ARRAYS:
                    element, oid = _ARRAYS[c.kind]
                    values = np.asarray(c.values)
                    out[f"{c.name}__ndim"] = 1 if values.shape[1] else 0
                    out[f"{c.name}__flags"] = 0
                    out[f"{c.name}__oid"] = oid
                    if values.shape[1]:
                        out[f"{c.name}__size"] = values.shape[1]
                        out[f"{c.name}__lbound"] = 1
                        out[c.name]["len"] = np.dtype(_FIXED[element]).itemsize
                        out[c.name]["value"] = values[rows]
                else:
                    out[c.name] = np.asarray(c.values)[rows]
            parts.append(out.tobytes())
    if trailer:
        parts.append(TRAILER)
    return b"".join(parts)
