"""Write one extraction run's rows with COPY, inside the caller's transaction.

Bulk tables (neurons with their vectors, value tokens, triggers) go in as binary COPY payloads built
column-wise by :mod:`catalog.store.copy`; the two tables with free text (tokens, prefixes) use
psycopg's row writer. Nothing here commits: the service publishes the run in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from catalog.extract.pipeline import CorpusAnalysis, LayerRecord
from catalog.store import search_index
from catalog.store.copy import Column, encode

CHUNK_ROWS = 250_000


def _np(t: torch.Tensor | None, n: int, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray | None]:
    """A column's values and null mask (all null where the tensor is None)."""
    if t is None:
        return np.zeros(n, dtype=dtype), np.ones(n, dtype=bool)
    return t.detach().cpu().numpy().astype(dtype, copy=False), None


def clean_text(s: str) -> str:
    # Postgres text cannot hold NUL; byte-level tokenizers can decode one.
    return s.replace("\x00", "\ufffd")


class RunWriter:
    """COPYs a run's rows through one psycopg connection; ``seconds`` counts the time spent writing."""

    def __init__(self, dbapi_conn: Any, run_id: int) -> None:
        self.conn = dbapi_conn
        self.run_id = run_id
        self.seconds = 0.0
        self.rows: dict[str, int] = {}
        self.bytes = 0
        self.search_seconds = 0.0  # deriving neuron_search rows (part of ``seconds``)

    def _copy_binary(self, table: str, columns: Sequence[Column]) -> None:
        t0 = time.perf_counter()
        names = ", ".join(c.name for c in columns)
        n = len(columns[0].values)
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as cp:
            for start in range(0, max(n, 1), CHUNK_ROWS):
                part = [_slice(c, start, start + CHUNK_ROWS) for c in columns]
                payload = encode(part, header=start == 0, trailer=start + CHUNK_ROWS >= n)
                self.bytes += len(payload)
                cp.write(payload)
        self.rows[table] = self.rows.get(table, 0) + n
        self.seconds += time.perf_counter() - t0

    def _copy_rows(self, table: str, names: Sequence[str], types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        t0 = time.perf_counter()
        count = 0
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(list(types))
            for row in rows:
                cp.write_row(row)
                count += 1
        self.rows[table] = self.rows.get(table, 0) + count
        self.seconds += time.perf_counter() - t0

    def tokens(self, texts: Sequence[str], unembedding: np.ndarray | None = None) -> None:
        """The vocabulary; ``unembedding`` [vocab, d_model] float32 (rows of E) for token ranking."""
        rid = self.run_id
        if unembedding is None:
            self._copy_rows(
                "tokens", ("run_id", "token_id", "text"), ("int4", "int4", "text"),
                ((rid, i, clean_text(t)) for i, t in enumerate(texts)),
            )
            return
        self._copy_rows(
            "tokens", ("run_id", "token_id", "text", "unembedding"), ("int4", "int4", "text", "vector"),
            ((rid, i, clean_text(t), unembedding[i]) for i, t in enumerate(texts)),
        )

    def prefixes(self, a: CorpusAnalysis) -> None:
        rid = self.run_id
        docs, pos = a.prefixes.documents.tolist(), a.prefixes.positions.tolist()
        tok, nxt = a.prefix_token.tolist(), a.prefix_next.tolist()
        after: list[str | None] = list(a.prefix_text_after) if a.prefix_text_after is not None else [None] * len(docs)
        self._copy_rows(
            "prefixes", ("run_id", "document", "position", "text", "token_id", "next_token_id", "text_after"),
            ("int4", "int8", "int4", "text", "int4", "int4", "text"),
            (
                (rid, d, p, clean_text(t), k, x if x >= 0 else None, None if r is None else clean_text(r))
                for d, p, t, k, x, r in zip(docs, pos, a.prefix_text, tok, nxt, after, strict=True)
            ),
        )

    def layer(self, rec: LayerRecord, layer_row: dict[str, Any]) -> None:
        self._layer_row(rec, layer_row)
        self._neurons(rec)
        self._value_tokens(rec)
        if rec.top is not None:
            self._triggers(rec)
            t0 = time.perf_counter()
            with self.conn.cursor() as cur:
                self.rows["neuron_search"] = self.rows.get("neuron_search", 0) + search_index.build_neuron_search(
                    cur, self.run_id, rec.layer
                )
            self.search_seconds += time.perf_counter() - t0

    def vector_indexes(self, dim: int) -> dict[str, float]:
        """The run's HNSW indexes, once every layer is in; seconds per index."""
        with self.conn.cursor() as cur:
            return search_index.create_vector_indexes(cur, self.run_id, dim)

    def _layer_row(self, rec: LayerRecord, row: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        cols = ["run_id", "layer", *row]
        t0 = time.perf_counter()
        with self.conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO layers ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                [self.run_id, rec.layer, *(Jsonb(v) if isinstance(v, dict) else v for v in row.values())],
            )
        self.seconds += time.perf_counter() - t0

    def _neurons(self, rec: LayerRecord) -> None:
        n = rec.keys.shape[0]
        w = rec.weights
        act = rec.activation or {}
        cols = [
            Column("run_id", "int4", np.full(n, self.run_id)),
            Column("layer", "int2", np.full(n, rec.layer)),
            Column("neuron", "int4", np.arange(n)),
            Column("key_norm", "float8", *_np(w.key_norm, n)),
            Column("value_norm", "float8", *_np(w.value_norm, n)),
            Column("up_norm", "float8", *_np(w.up_norm, n)),
            Column("bias", "float8", *_np(w.bias, n)),
            Column("alignment", "float8", *_np(w.alignment, n)),
            Column("up_alignment", "float8", *_np(w.up_alignment, n)),
            Column("key_vector", "vector", rec.keys.numpy(), nan_is_null=False),
            Column("value_vector", "vector", rec.values.numpy(), nan_is_null=False),
            Column(
                "up_vector", "vector",
                rec.ups.numpy() if rec.ups is not None else np.zeros((n, 1), np.float32),
                None if rec.ups is not None else np.ones(n, bool), nan_is_null=False,
            ),
            Column("activation_mean", "float8", *_np(act.get("mean"), n)),
            Column("activation_std", "float8", *_np(act.get("std"), n)),
            Column("activation_positive_fraction", "float8", *_np(act.get("positive_fraction"), n)),
            Column("activation_max", "float8", *_np(act.get("max"), n)),
            Column("agreement", "float8", *_np(rec.agreement.agreement if rec.agreement else None, n)),
            Column("next_token_mean_rank", "float8", *_np(rec.agreement.mean_rank if rec.agreement else None, n)),
        ]
        abl = rec.ablation or {}
        for kind in ("last", "first", "random"):
            cols.append(Column(f"ablation_{kind}", "float8", *_np(abl.get(kind), n)))
        cols.append(Column("suggested_label", "label", rec.labels if rec.labels is not None else [None] * n))
        fire = rec.firing or {}
        base = rec.agreement
        lab = rec.label
        extra: dict[str, torch.Tensor | None] = {
            "gate_open_fraction": fire.get("gate_open_fraction"),
            "abs_coefficient_p50": fire.get("abs_p50"),
            "abs_coefficient_p90": fire.get("abs_p90"),
            "abs_coefficient_p99": fire.get("abs_p99"),
            "negative_trigger_share": rec.negative_share,
            "agreement_shuffled": base.shuffled if base else None,
            "agreement_folded": base.folded if base else None,
            "agreement_top1": base.top1 if base else None,
            "agreement_negative": base.negative if base else None,
            "next_token_rank_percentile": base.rank_percentile if base else None,
            "next_token_rank_percentile_shuffled": base.rank_percentile_shuffled if base else None,
            "top_token_frequency": base.top_token_frequency if base else None,
            "label_contrast": lab.inputs.contrast if lab else None,
            "label_context": lab.inputs.context if lab else None,
            "label_confidence": lab.confidence if lab else None,
        }
        cols.extend(Column(name, "float8", *_np(t, n)) for name, t in extra.items())
        cols.append(Column("label_triggers", "int4", *_np(lab.inputs.triggers if lab else None, n, np.int64)))
        self._copy_binary("neurons", cols)

    def _value_tokens(self, rec: LayerRecord) -> None:
        parts = []
        projections = [("raw", rec.projection)]
        if rec.projection_folded is not None:
            projections.append(("folded", rec.projection_folded))
        for convention, p in projections:
            for kind, ids, logits in (("top", p.top_ids, p.top_logits), ("bottom", p.bottom_ids, p.bottom_logits)):
                d, k = ids.shape
                parts.append((convention, kind, np.repeat(np.arange(d), k), np.tile(np.arange(k), d),
                              ids.numpy().reshape(-1), logits.double().numpy().reshape(-1)))
        m = sum(len(x[2]) for x in parts)
        self._copy_binary("value_tokens", [
            Column("run_id", "int4", np.full(m, self.run_id)),
            Column("layer", "int2", np.full(m, rec.layer)),
            Column("neuron", "int4", np.concatenate([x[2] for x in parts])),
            Column("convention", "label", [x[0] for x in parts for _ in range(len(x[2]))]),
            Column("kind", "label", [x[1] for x in parts for _ in range(len(x[2]))]),
            Column("rank", "int2", np.concatenate([x[3] for x in parts])),
            Column("token_id", "int4", np.concatenate([x[4] for x in parts])),
            Column("logit", "float8", np.concatenate([x[5] for x in parts])),
        ])

    def _triggers(self, rec: LayerRecord) -> None:
        assert rec.top is not None
        blocks = [(1, rec.top, rec.top_ablated)]
        if rec.bottom is not None:
            blocks.append((-1, rec.bottom, None))
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "neuron", "sign", "rank", "document", "position", "coefficient", "last", "first", "random")}
        for sign, state, ablated in blocks:
            docs = state.documents.cpu()
            keep = (docs >= 0).numpy()
            d, k = docs.shape
            neuron, rank = np.repeat(np.arange(d), k), np.tile(np.arange(k), d)
            flat = keep.reshape(-1)
            cols["neuron"].append(neuron[flat])
            cols["rank"].append(rank[flat])
            cols["sign"].append(np.full(int(flat.sum()), sign))
            cols["document"].append(docs.numpy().reshape(-1)[flat])
            cols["position"].append(state.positions.cpu().numpy().reshape(-1)[flat])
            cols["coefficient"].append((state.values.cpu().double().numpy() * sign).reshape(-1)[flat])
            for kind in ("last", "first", "random"):
                if ablated is None or kind not in ablated:  # negative triggers; encoders (no ablations)
                    cols[kind].append(np.full(int(flat.sum()), np.nan))
                else:
                    cols[kind].append(ablated[kind].double().numpy().reshape(-1)[flat])
        c = {k: np.concatenate(v) for k, v in cols.items()}
        m = len(c["neuron"])
        self._copy_binary("triggers", [
            Column("run_id", "int4", np.full(m, self.run_id)),
            Column("layer", "int2", np.full(m, rec.layer)),
            Column("neuron", "int4", c["neuron"]),
            Column("sign", "int2", c["sign"]),
            Column("rank", "int2", c["rank"]),
            Column("document", "int8", c["document"]),
            Column("position", "int4", c["position"]),
            Column("coefficient", "float8", c["coefficient"]),
            Column("coefficient_without_last", "float8", c["last"]),
            Column("coefficient_without_first", "float8", c["first"]),
            Column("coefficient_without_random", "float8", c["random"]),
        ])


def _slice(c: Column, start: int, stop: int) -> Column:
    values = c.values[start:stop]
    null = None if c.null is None else c.null[start:stop]
    return Column(c.name, c.kind, values, null, c.nan_is_null)
