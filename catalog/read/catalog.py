"""Catalog entries, their current runs, layers and full neuron records: the queries that the API,
the CLI's ``show``/``layers``/``export`` and the review UI share.

Records are read layer by layer (three queries per layer) so memory stays bounded by one layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select, text, true
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from catalog import histograms as histograms_rule
from catalog import vocab
from catalog.read.errors import CatalogMissing, NotFound
from catalog.store.models import (
    NEURON_STATS,
    CatalogModel,
    ExtractionRun,
    Layer,
    Neuron,
    Prefix,
    Token,
    Trigger,
    ValueToken,
)

NEURON_FIELDS = vocab.NEURON_FIELDS  # every per-neuron figure: NEURON_STATS, then suggested_label
LAYER_FIELDS = vocab.LAYER_STATS  # the layers row's figures
NO_SCHEMA = "the database has no catalog yet (no schema): run `neuron-catalog extract` first"


def clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def current_run(session: Session, name: str) -> tuple[CatalogModel, ExtractionRun] | None:
    """The entry named ``name`` and its published run, or None."""
    try:
        row = session.execute(
            select(CatalogModel, ExtractionRun)
            .join(ExtractionRun, ExtractionRun.id == CatalogModel.current_run_id)
            .where(CatalogModel.name == name)
        ).first()
    except ProgrammingError as exc:  # relation "catalog_models" does not exist: a new database
        session.rollback()
        raise CatalogMissing(NO_SCHEMA) from exc
    return None if row is None else (row[0], row[1])


def require_run(session: Session, name: str) -> tuple[CatalogModel, ExtractionRun]:
    """The entry and its published run, or NotFound. Remembered for the session's life: a request's
    session asks once however many queries of a page need it (sessions here are short)."""
    memo: dict[str, tuple[CatalogModel, ExtractionRun]] = session.info.setdefault("require_run", {})
    if name in memo:
        return memo[name]
    found = current_run(session, name)
    if found is None:
        raise NotFound(f"no completed catalog named {name!r} (GET /api/v1/models or `neuron-catalog runs` lists them)")
    memo[name] = found
    return found


def catalog_names(session: Session) -> list[str]:
    return list(session.scalars(
        select(CatalogModel.name).where(CatalogModel.current_run_id.is_not(None)).order_by(CatalogModel.name)
    ))


def list_models(session: Session, *, after: str | None = None, limit: int = 100) -> list[tuple[CatalogModel, ExtractionRun | None]]:
    """Catalog entries by name, each with its current run (None while its first run is in progress)."""
    try:
        stmt = select(CatalogModel).order_by(CatalogModel.name).limit(limit)
        if after is not None:
            stmt = stmt.where(CatalogModel.name > after)
        entries = list(session.scalars(stmt))
    except ProgrammingError as exc:
        session.rollback()
        raise CatalogMissing(NO_SCHEMA) from exc
    run_ids = [e.current_run_id for e in entries if e.current_run_id is not None]
    runs = {r.id: r for r in session.scalars(select(ExtractionRun).where(ExtractionRun.id.in_(run_ids)))}
    return [(e, runs.get(e.current_run_id) if e.current_run_id is not None else None) for e in entries]


def layer_summaries(session: Session, name: str, *, histograms: bool = False) -> list[dict[str, Any]]:
    """One row per layer of ``name``'s current run: seed 000 and seed 001 figures, label counts."""
    _, run = require_run(session, name)
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
        row.update({f: clean(getattr(stored, f)) for f in LAYER_FIELDS})
        row["label_counts"] = dict(counts[stored.layer])
        if histograms:
            # runs made before the clipping rule stored full-range histograms: normalised() says so
            row["histograms"] = {k: histograms_rule.normalised(h) if isinstance(h, dict) else h
                                 for k, h in (stored.histograms or {}).items()}
        rows.append(row)
    return rows


def records(
    session: Session, name: str, *, vectors: bool = False,
    layers: list[int] | None = None, neurons: list[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of ``name``'s current run, by layer then neuron (optionally only some of them)."""
    entry, run = require_run(session, name)
    rid = run.id
    only_layers = range(entry.n_layers) if layers is None else [x for x in layers if 0 <= x < entry.n_layers]
    # The whole vocabulary is only worth reading when many neurons are wanted.
    vocab: dict[int, str] | None = None
    if neurons is None or len(neurons) * len(only_layers) > 64:
        vocab = dict(session.execute(select(Token.token_id, Token.text).where(Token.run_id == rid)).tuples().all())
    for layer in only_layers:
        only = (lambda col: col.in_(neurons)) if neurons is not None else (lambda col: true())
        top_rows = session.execute(
            select(ValueToken.neuron, ValueToken.convention, ValueToken.kind, ValueToken.token_id, ValueToken.logit)
            .where(ValueToken.run_id == rid, ValueToken.layer == layer, only(ValueToken.neuron))
            .order_by(ValueToken.neuron, ValueToken.convention, ValueToken.kind, ValueToken.rank)
        ).tuples().all()
        # The layer's triggers first (primary key), then their prefixes. As a plain join the planner
        # walks every prefix of the run through the triggers' (run, document, position) index and
        # drops the other layers' rows: 20 s a layer on SmolLM2's demo catalog, against 0.3 s.
        t = (select(Trigger.neuron, Trigger.sign, Trigger.rank, Trigger.document, Trigger.position,
                    Trigger.coefficient, Trigger.coefficient_without_last, Trigger.coefficient_without_first,
                    Trigger.coefficient_without_random)
             .where(Trigger.run_id == rid, Trigger.layer == layer, only(Trigger.neuron))
             .cte("layer_triggers").prefix_with("MATERIALIZED"))
        trigger_rows = session.execute(
            select(
                t.c.neuron, t.c.sign, t.c.document, t.c.position, t.c.coefficient, t.c.coefficient_without_last,
                t.c.coefficient_without_first, t.c.coefficient_without_random,
                Prefix.text, Prefix.next_token_id, Prefix.text_after,
            )
            .join_from(t, Prefix, (Prefix.run_id == rid) & (Prefix.document == t.c.document)
                       & (Prefix.position == t.c.position))
            .order_by(t.c.neuron, t.c.sign.desc(), t.c.rank)
        ).tuples().all()
        names = vocab
        if names is None:
            wanted = {r[3] for r in top_rows} | {r[9] for r in trigger_rows if r[9] is not None}
            names = dict(session.execute(
                select(Token.token_id, Token.text).where(Token.run_id == rid, Token.token_id.in_(wanted))
            ).tuples().all())
        tokens: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for n, convention, kind, tid, logit in top_rows:
            tokens[n][f"{kind}_{convention}"].append({"token_id": tid, "token": names.get(tid), "logit": logit})
        triggers: dict[int, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: {1: [], -1: []})
        for n, sign, doc, pos, coef, wl, wf, wr, txt, nxt, after in trigger_rows:
            item: dict[str, Any] = {"document": doc, "position": pos, "text": txt, "activation": coef,
                                    "next_token_id": nxt, "next_token": names.get(nxt) if nxt is not None else None,
                                    "text_after": after}
            if sign > 0:
                item.update(without_last=clean(wl), without_first=clean(wf), without_random=clean(wr))
            triggers[n][sign].append(item)
        cols = [Neuron.neuron, *(getattr(Neuron, f) for f in NEURON_FIELDS)]
        if vectors:
            cols += [Neuron.key_vector, Neuron.value_vector, Neuron.up_vector]
        for row in session.execute(
            select(*cols).where(Neuron.run_id == rid, Neuron.layer == layer, only(Neuron.neuron)).order_by(Neuron.neuron)
        ).tuples():
            n = row[0]
            rec: dict[str, Any] = {"model": name, "run_id": rid, "layer": layer, "neuron": n}
            rec.update({f: clean(v) for f, v in zip(NEURON_FIELDS, row[1 : 1 + len(NEURON_FIELDS)], strict=True)})
            positive = triggers[n][1]
            # agreement and next_token_mean_rank are computed over the triggers that have a next token
            # an encoder's triggers are scored against their own token: every trigger counts
            rec["agreement_triggers"] = (sum(1 for t in positive if t["next_token_id"] is not None)
                                         if entry.causal else len(positive))
            rec["value_top_tokens"] = tokens[n]["top_raw"]
            rec["value_bottom_tokens"] = tokens[n]["bottom_raw"]
            rec["value_top_tokens_folded"] = tokens[n]["top_folded"]
            rec["value_bottom_tokens_folded"] = tokens[n]["bottom_folded"]
            rec["triggers"] = positive
            if entry.gated:
                rec["negative_triggers"] = triggers[n][-1]
            if vectors:
                # pgvector's SQLAlchemy type returns a numpy array or a list, by version
                rec["key_vector"] = [float(x) for x in row[-3]]
                rec["value_vector"] = [float(x) for x in row[-2]]
                if row[-1] is not None:
                    rec["up_vector"] = [float(x) for x in row[-1]]
            yield rec


def neuron_record(session: Session, name: str, layer: int, neuron: int, *, vectors: bool = False) -> dict[str, Any]:
    entry, _ = require_run(session, name)
    if not 0 <= layer < entry.n_layers or not 0 <= neuron < entry.d_mlp:
        raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron} "
                       f"(layers 0-{entry.n_layers - 1}, neurons 0-{entry.d_mlp - 1})")
    for rec in records(session, name, vectors=vectors, layers=[layer], neurons=[neuron]):
        return rec
    raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron}")


def _num(column: str) -> str:
    # NaN is not JSON; records() shows it as null too (clean)
    return f"CASE WHEN {column} = 'NaN'::float8 THEN NULL ELSE {column} END"


def _triggers_json(sign: int, ablations: bool) -> str:
    extra = "".join(f", 'without_{k}', {_num(f't.coefficient_without_{k}') if ablations else 'NULL'}"
                    for k in vocab.ABLATIONS)
    return f"""coalesce((
        SELECT json_agg(json_build_object('document', t.document, 'position', t.position, 'text', p.text,
                        'activation', t.coefficient, 'next_token_id', p.next_token_id, 'next_token', nt.text,
                        'text_after', p.text_after{extra})
                        ORDER BY t.rank)
        FROM triggers t
        JOIN prefixes p ON p.run_id = t.run_id AND p.document = t.document AND p.position = t.position
        LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
        WHERE t.run_id = n.run_id AND t.layer = n.layer AND t.neuron = n.neuron AND t.sign = {sign}), '[]')"""


def _tokens_json(kind: str, convention: str = "raw") -> str:
    return f"""coalesce((
        SELECT json_agg(json_build_object('token_id', vt.token_id, 'token', tk.text, 'logit', vt.logit) ORDER BY vt.rank)
        FROM value_tokens vt LEFT JOIN tokens tk ON tk.run_id = vt.run_id AND tk.token_id = vt.token_id
        WHERE vt.run_id = n.run_id AND vt.layer = n.layer AND vt.neuron = n.neuron AND vt.kind = '{kind}'
              AND vt.convention = '{convention}'), '[]')"""


# The record of one neuron (NeuronRecord's fields, vectors null) built by Postgres as JSON text in one
# statement: what records() assembles in Python from four queries, for the API's neuron route.
_RECORD_JSON_SQL = text(f"""
SELECT json_build_object(
    {", ".join(f"'{f}', {_num('n.' + f)}" for f in NEURON_STATS)}, 'suggested_label', n.suggested_label,
    'model', CAST(:name AS text), 'run_id', n.run_id, 'layer', n.layer, 'neuron', n.neuron,
    'agreement_triggers', (SELECT count(*) FROM triggers t JOIN prefixes p ON p.run_id = t.run_id
                           AND p.document = t.document AND p.position = t.position
                           WHERE t.run_id = n.run_id AND t.layer = n.layer AND t.neuron = n.neuron AND t.sign = 1
                           AND (p.next_token_id IS NOT NULL OR NOT CAST(:causal AS boolean))),
    'value_top_tokens', {_tokens_json("top")}, 'value_bottom_tokens', {_tokens_json("bottom")},
    'value_top_tokens_folded', {_tokens_json("top", "folded")},
    'value_bottom_tokens_folded', {_tokens_json("bottom", "folded")},
    'triggers', {_triggers_json(1, True)},
    'negative_triggers', CASE WHEN CAST(:gated AS boolean) THEN {_triggers_json(-1, False)} END,
    'key_vector', NULL, 'value_vector', NULL, 'up_vector', NULL)::text
FROM neurons n WHERE n.run_id = :run AND n.layer = :layer AND n.neuron = :neuron
""")


def neuron_record_json(session: Session, name: str, layer: int, neuron: int) -> str:
    """:func:`neuron_record` (without vectors) as the JSON text of a NeuronRecord, in one statement."""
    entry, run = require_run(session, name)
    if not 0 <= layer < entry.n_layers or not 0 <= neuron < entry.d_mlp:
        raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron} "
                       f"(layers 0-{entry.n_layers - 1}, neurons 0-{entry.d_mlp - 1})")
    found = session.execute(_RECORD_JSON_SQL, {"name": name, "gated": entry.gated, "causal": entry.causal,
                                               "run": run.id, "layer": layer,
                                               "neuron": neuron}).scalar()
    if found is None:
        raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron}")
    return str(found)
