"""Neuron search: filters by layer, statistic, label, text pattern and token; sorts; keyset pages.

Every filter is served by an index (migration 0002): the primary key for layers and the default
order, one btree per statistic for ranges and sorts, GIN over ``neuron_search`` for patterns and
trigger/next tokens, ``ix_value_tokens_run_token_rank`` for promoted tokens. A pattern matches a
neuron when one of its positive trigger prefixes matches (``websearch_to_tsquery``); the GIN index
over the neuron's lexemes finds the candidates and the prefixes of each candidate (at most top_n,
through the triggers primary key) are checked exactly.

Pages are keyset pages in (sort value, layer, neuron) order, so no neuron is repeated or skipped
across pages; neurons lacking the sorted figure (null) come last, in (layer, neuron) order. The
cursor names the run it was made on: pages never mix runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import TSQUERY
from sqlalchemy.orm import Session

from catalog.read.catalog import clean, require_run
from catalog.read.errors import InvalidParameter
from catalog.read.schemas import NeuronSummary, ResolvedToken, SearchPage, TokenLogit, TopTrigger
from catalog.read.tokens import clean_arg, resolve_token
from catalog.store.models import (
    HUMAN_LABELS,
    LABELS,
    NEURON_STATS,
    PROJECTIONS,
    TEXT_SEARCH_CONFIG,
    Annotation,
    Annotator,
    Neuron,
    NeuronSearch,
    Prefix,
    Trigger,
    ValueToken,
)

SORT_KEYS = ("layer", *NEURON_STATS)
MAX_LIMIT = 500
MAX_Q = 500
SUMMARY_TOKENS = 5

N = Neuron.__table__
S = NeuronSearch.__table__
T = Trigger.__table__
P = Prefix.__table__
VT = ValueToken.__table__
A = Annotation.__table__
CONFIG: ColumnElement[Any] = literal_column(f"'{TEXT_SEARCH_CONFIG}'::regconfig")
_SINGLE_LEXEME = re.compile(r"^'(?:[^']|'')+'$")
_PHRASE_OP = re.compile(r"<(?:\d+|-)>")


@dataclass(frozen=True)
class SearchQuery:
    layers: tuple[int, ...] = ()
    layer_min: int | None = None
    layer_max: int | None = None
    ranges: tuple[tuple[str, str, float], ...] = ()  # (statistic, "min" | "max", bound)
    label: str | None = None
    q: str | None = None
    token: str | None = None
    token_rank: int = 30
    # which value projection the token filter and the summaries' top tokens use (models.PROJECTIONS)
    projection: str = "raw"
    trigger_token: str | None = None
    next_token: str | None = None
    # annotations (part 4): any annotator's current label; annotated by anyone or nobody; by this annotator
    human_label: str | None = None
    annotated: bool | None = None
    annotator: str | None = None
    sort: str | None = None  # a SORT_KEYS entry, "-" in front for descending
    limit: int = 50
    cursor: str | None = None

    def fingerprint(self) -> str:
        """What a cursor must have been made for: everything but the cursor and the page size."""
        fields = asdict(self)
        fields.pop("cursor")
        fields.pop("limit")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Order:
    key: str  # "layer" or a statistic
    descending: bool


@dataclass(frozen=True)
class _Cursor:
    phase: str  # "v": rows with a value, "n": rows where the sorted figure is null
    value: float | None
    layer: int
    neuron: int


def _order(sort: str | None) -> _Order:
    if sort is None or sort == "":
        return _Order("layer", False)
    key, descending = (sort[1:], True) if sort.startswith("-") else (sort, False)
    if key not in SORT_KEYS:
        raise InvalidParameter(f"sort: unknown figure {key!r}; one of {', '.join(SORT_KEYS)} ('-' for descending)")
    return _Order(key, descending)


def encode_cursor(run_id: int, fingerprint: str, c: _Cursor) -> str:
    raw = json.dumps({"r": run_id, "f": fingerprint, "p": c.phase, "k": [c.value, c.layer, c.neuron]},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, run_id: int, fingerprint: str) -> _Cursor:
    bad = InvalidParameter("cursor: not a cursor from this search (pass next_cursor back unchanged, with the "
                           "same filters and sort)")
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        phase, (value, layer, neuron) = raw["p"], raw["k"]
        made_for, run = raw["f"], raw["r"]
    except (ValueError, KeyError, TypeError) as exc:
        raise bad from exc
    if made_for != fingerprint or phase not in ("v", "n") or not isinstance(run, int):
        raise bad
    if run != run_id:
        raise InvalidParameter(f"cursor: made on run {run}, but the catalog is now run {run_id} "
                               "(re-extracted); start again without a cursor")
    if not (isinstance(layer, int) and isinstance(neuron, int) and 0 <= layer < 2**15 and 0 <= neuron < 2**31):
        raise bad
    if phase == "v" and not (isinstance(value, int | float) and math.isfinite(value)):
        raise bad
    return _Cursor(phase, float(value) if phase == "v" else None, layer, neuron)


def _tsquery(session: Session, q: str) -> tuple[str, str | None]:
    """(the query as tsquery text, a looser query over a neuron's lexemes or None when there is none)."""
    full, tree = session.execute(
        text("SELECT websearch_to_tsquery(CAST(:c AS regconfig), :q)::text, "
             "querytree(websearch_to_tsquery(CAST(:c AS regconfig), :q))"),
        {"c": TEXT_SEARCH_CONFIG, "q": q},
    ).one()
    if not full:
        raise InvalidParameter(f"q: {q!r} has no words to search for")
    # The lexeme set has no positions: a phrase can only be required as all of its words (then
    # checked as a phrase per prefix). Negated words are not in the tree: a neuron may have them in
    # one prefix and not another.
    return full, None if tree == "T" else _PHRASE_OP.sub("&", tree)


def _annotated_by(model_id: int, *where: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists(select(1).where(A.c.model_id == model_id, A.c.layer == N.c.layer, A.c.neuron == N.c.neuron,
                                  *where))


def _description_matches(session: Session, model_id: int, full: str) -> list[tuple[int, int]]:
    """(layer, neuron) of the neurons whose annotation descriptions match the tsquery ``full``."""
    return [tuple(r) for r in session.execute(  # type: ignore[misc]
        select(A.c.layer, A.c.neuron).distinct()
        .where(A.c.model_id == model_id, func.to_tsvector(CONFIG, A.c.description).op("@@")(cast(full, TSQUERY)))
    ).all()]


def _conditions(session: Session, run_id: int, n_layers: int, value_top: int, vocab: int,
                query: SearchQuery, model_id: int = 0,
                ) -> tuple[list[ColumnElement[bool]], list[Any], bool | None, dict[str, ResolvedToken]]:
    """WHERE conditions on N (and S when the third value is True, outer-joined when it is None),
    subqueries of (layer, neuron) to join, and the tokens resolved."""
    conds: list[ColumnElement[bool]] = [N.c.run_id == run_id]
    joins: list[Any] = []
    needs_search: bool | None = False
    resolved: dict[str, ResolvedToken] = {}
    for layer in (*query.layers, query.layer_min, query.layer_max):
        if layer is not None and not 0 <= layer < n_layers:
            raise InvalidParameter(f"layer: {layer} is out of range (this model has layers 0-{n_layers - 1})")
    if query.layers:
        conds.append(N.c.layer.in_(sorted(set(query.layers))))
    if query.layer_min is not None:
        conds.append(N.c.layer >= query.layer_min)
    if query.layer_max is not None:
        conds.append(N.c.layer <= query.layer_max)
    for stat, bound, value in query.ranges:
        if stat not in NEURON_STATS or bound not in ("min", "max"):
            raise InvalidParameter(f"{bound}_{stat}: unknown statistic; one of {', '.join(NEURON_STATS)}")
        if not math.isfinite(value):
            raise InvalidParameter(f"{bound}_{stat}: must be a finite number")
        conds.append(N.c[stat] >= value if bound == "min" else N.c[stat] <= value)
    if query.label is not None:
        if query.label not in LABELS:
            raise InvalidParameter(f"label: unknown label {query.label!r}; one of {', '.join(LABELS)}")
        conds.append(N.c.suggested_label == query.label)
    if query.q is not None:
        q = clean_arg(query.q).strip()
        if not q or len(q) > MAX_Q:
            raise InvalidParameter(f"q: give a pattern of 1-{MAX_Q} characters")
        full, loose = _tsquery(session, q)
        needs_search = True
        pattern: list[ColumnElement[bool]] = []
        if loose is not None:
            pattern.append(S.c.terms.op("@@")(cast(loose, TSQUERY)))
        if loose is None or not _SINGLE_LEXEME.match(full):
            # one word needs no second look: the lexeme set says it all
            pattern.append(exists(
                select(1).select_from(T.join(P, and_(P.c.run_id == T.c.run_id, P.c.document == T.c.document,
                                                      P.c.position == T.c.position)))
                .where(T.c.run_id == N.c.run_id, T.c.layer == N.c.layer, T.c.neuron == N.c.neuron, T.c.sign == 1,
                       func.to_tsvector(CONFIG, P.c.text).op("@@")(cast(full, TSQUERY)))
            ))
        # Annotation descriptions match too (part 4). They are few (people write them), so the
        # matching neurons are listed first and the prefix plan stays as it was when none match.
        described = _description_matches(session, model_id, full)
        if described:
            conds.append(or_(and_(*pattern), tuple_(N.c.layer, N.c.neuron).in_(described)))
            needs_search = None  # outer join: a described neuron may lack search terms
        else:
            conds.extend(pattern)
    if query.token is not None:
        if not 1 <= query.token_rank <= value_top:
            raise InvalidParameter(f"token_rank: must be 1-{value_top} (the run stores the top {value_top} tokens)")
        tok = resolved["token"] = resolve_token(session, run_id, query.token, vocab_size=vocab, param="token")
        # A join on the distinct promoting neurons, not EXISTS: the planner then starts from the
        # (run, token, rank) index instead of merging with every neuron in order.
        joins.append(
            select(VT.c.layer, VT.c.neuron).distinct()
            .where(VT.c.run_id == run_id, VT.c.kind == "top", VT.c.convention == query.projection,
                   VT.c.rank < query.token_rank,
                   VT.c.token_id.in_(tok.token_ids))
            .subquery("promoting")
        )
    for param, column in (("trigger_token", S.c.trigger_tokens), ("next_token", S.c.next_tokens)):
        given = getattr(query, param)
        if given is not None:
            tok = resolved[param] = resolve_token(session, run_id, given, vocab_size=vocab, param=param)
            conds.append(column.op("&&")(cast(tok.token_ids, S.c.trigger_tokens.type)))
            needs_search = True
    if query.human_label is not None:
        if query.human_label not in HUMAN_LABELS:
            raise InvalidParameter(f"human_label: unknown label {query.human_label!r}; one of {', '.join(HUMAN_LABELS)}")
        conds.append(_annotated_by(model_id, A.c.label == query.human_label))
    if query.annotated is not None:
        conds.append(_annotated_by(model_id) if query.annotated else ~_annotated_by(model_id))
    if query.annotator is not None:
        annotator_id = session.scalar(select(Annotator.id).where(Annotator.name == query.annotator))
        if annotator_id is None:
            raise InvalidParameter(f"annotator: no annotator named {query.annotator!r}")
        conds.append(_annotated_by(model_id, A.c.annotator_id == annotator_id))
    return conds, joins, needs_search, resolved


def _base(conds: list[ColumnElement[bool]], joins: list[Any], needs_search: bool | None) -> Select[Any]:
    cols = [N.c.layer, N.c.neuron, *(N.c[s] for s in NEURON_STATS), N.c.suggested_label]
    source: Any = N
    if needs_search is not False:
        on = and_(S.c.run_id == N.c.run_id, S.c.layer == N.c.layer, S.c.neuron == N.c.neuron)
        source = source.join(S, on) if needs_search else source.outerjoin(S, on)
    for sub in joins:
        source = source.join(sub, and_(sub.c.layer == N.c.layer, sub.c.neuron == N.c.neuron))
    return select(*cols).select_from(source).where(*conds)


def _fetch(session: Session, base: Select[Any], order: _Order, after: _Cursor | None, n: int) -> list[tuple[str, Any]]:
    """Up to ``n`` rows after ``after``, each with the phase it came from."""
    rows: list[tuple[str, Any]] = []
    ln = tuple_(N.c.layer, N.c.neuron)
    if order.key == "layer":
        stmt = base
        if after is not None:
            stmt = stmt.where(ln < (after.layer, after.neuron) if order.descending else ln > (after.layer, after.neuron))
        by: tuple[Any, ...] = (N.c.layer.desc(), N.c.neuron.desc()) if order.descending else (N.c.layer, N.c.neuron)
        return [("v", r) for r in session.execute(stmt.order_by(*by).limit(n)).all()]
    stat = N.c[order.key]
    if after is None or after.phase == "v":
        stmt = base.where(stat.is_not(None))
        if after is not None:
            key = tuple_(stat, N.c.layer, N.c.neuron)
            bound = (after.value, after.layer, after.neuron)
            stmt = stmt.where(key < bound if order.descending else key > bound)
        cols = (stat.desc(), N.c.layer.desc(), N.c.neuron.desc()) if order.descending else (stat, N.c.layer, N.c.neuron)
        rows = [("v", r) for r in session.execute(stmt.order_by(*cols).limit(n)).all()]
    if len(rows) < n:
        stmt = base.where(stat.is_(None))
        if after is not None and after.phase == "n":
            stmt = stmt.where(ln > (after.layer, after.neuron))
        rows += [("n", r) for r in session.execute(stmt.order_by(N.c.layer, N.c.neuron).limit(n - len(rows))).all()]
    return rows


_TOP_TOKENS_SQL = text(f"""
SELECT vt.layer, vt.neuron, vt.token_id, vt.logit, t.text
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) AS k(layer, neuron)
JOIN value_tokens vt ON vt.run_id = :run AND vt.layer = k.layer AND vt.neuron = k.neuron
                    AND vt.kind = 'top' AND vt.convention = :conv AND vt.rank < {SUMMARY_TOKENS}
JOIN tokens t ON t.run_id = vt.run_id AND t.token_id = vt.token_id
ORDER BY vt.layer, vt.neuron, vt.rank
""")
_TOP_TRIGGER_SQL = text("""
SELECT tr.layer, tr.neuron, tr.coefficient, p.text, nt.text
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) AS k(layer, neuron)
JOIN triggers tr ON tr.run_id = :run AND tr.layer = k.layer AND tr.neuron = k.neuron AND tr.sign = 1 AND tr.rank = 0
JOIN prefixes p ON p.run_id = tr.run_id AND p.document = tr.document AND p.position = tr.position
LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
""")


def _summaries(session: Session, run_id: int, rows: list[Any], projection: str = "raw") -> list[NeuronSummary]:
    """The page's neurons with their five top tokens and strongest trigger (two queries for the page)."""
    if not rows:
        return []
    keys = {"run": run_id, "layers": [r.layer for r in rows], "neurons": [r.neuron for r in rows], "conv": projection}
    tokens: dict[tuple[int, int], list[TokenLogit]] = {(r.layer, r.neuron): [] for r in rows}
    for layer, neuron, tid, logit, txt in session.execute(_TOP_TOKENS_SQL, keys).tuples():
        tokens[(layer, neuron)].append(TokenLogit(token_id=tid, token=txt, logit=logit))
    top = {
        (layer, neuron): TopTrigger(text=txt, activation=coef, next_token=nxt)
        for layer, neuron, coef, txt, nxt in session.execute(_TOP_TRIGGER_SQL, keys).tuples()
    }
    out = []
    for r in rows:
        fields = {s: clean(getattr(r, s)) for s in NEURON_STATS}
        out.append(NeuronSummary(layer=r.layer, neuron=r.neuron, suggested_label=r.suggested_label,
                                 top_tokens=tokens[(r.layer, r.neuron)], top_trigger=top.get((r.layer, r.neuron)),
                                 **fields))
    return out


def _page(session: Session, name: str, query: SearchQuery) -> tuple[int, list[Any], str | None, dict[str, ResolvedToken]]:
    """(run id, the page's rows, next cursor, resolved tokens) of one search page."""
    entry, run = require_run(session, name)
    if not 1 <= query.limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit: must be 1-{MAX_LIMIT}")
    order = _order(query.sort)
    if query.projection not in PROJECTIONS:
        raise InvalidParameter(f"projection: one of {', '.join(PROJECTIONS)}")
    fingerprint = hashlib.sha256(f"{name}\n{query.fingerprint()}".encode()).hexdigest()[:16]
    after = decode_cursor(query.cursor, run.id, fingerprint) if query.cursor else None
    value_top = int((run.parameters or {}).get("value_top", 30))
    conds, joins, needs_search, resolved = _conditions(session, run.id, entry.n_layers, value_top, entry.vocab_size,
                                                       query, entry.id)
    rows = _fetch(session, _base(conds, joins, needs_search), order, after, query.limit + 1)
    page, more = rows[: query.limit], len(rows) > query.limit
    next_cursor = None
    if more:
        phase, last = page[-1]
        # the layer sort keeps its key in (layer, neuron); the value slot then just repeats the layer
        value = float(last.layer) if order.key == "layer" else None if phase == "n" else float(getattr(last, order.key))
        next_cursor = encode_cursor(run.id, fingerprint, _Cursor(phase, value if phase == "v" else None,
                                                                 last.layer, last.neuron))
    return run.id, [r for _, r in page], next_cursor, resolved


def search(session: Session, name: str, query: SearchQuery) -> SearchPage:
    """One page of the neurons of ``name``'s current run that pass every filter of ``query``."""
    run_id, rows, next_cursor, resolved = _page(session, name, query)
    return SearchPage(items=_summaries(session, run_id, rows, query.projection), next_cursor=next_cursor, resolved_tokens=resolved)


def _num(column: str) -> str:
    return f"CASE WHEN {column} = 'NaN'::float8 THEN NULL ELSE {column} END"  # clean(): NaN shows as null


# The page's NeuronSummary items, in page order, as JSON text built by Postgres in one statement
# (what _summaries assembles from two queries and pydantic).
_SUMMARIES_JSON_SQL = text(f"""
SELECT coalesce(json_agg(json_build_object(
    {", ".join(f"'{f}', {_num('n.' + f)}" for f in NEURON_STATS)}, 'suggested_label', n.suggested_label,
    'layer', n.layer, 'neuron', n.neuron,
    'top_tokens', coalesce((
        SELECT json_agg(json_build_object('token_id', vt.token_id, 'token', t.text, 'logit', vt.logit) ORDER BY vt.rank)
        FROM value_tokens vt JOIN tokens t ON t.run_id = vt.run_id AND t.token_id = vt.token_id
        WHERE vt.run_id = n.run_id AND vt.layer = n.layer AND vt.neuron = n.neuron AND vt.kind = 'top'
          AND vt.convention = :conv AND vt.rank < {SUMMARY_TOKENS}), '[]'),
    'top_trigger', (
        SELECT json_build_object('text', p.text, 'activation', tr.coefficient, 'next_token', nt.text)
        FROM triggers tr
        JOIN prefixes p ON p.run_id = tr.run_id AND p.document = tr.document AND p.position = tr.position
        LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
        WHERE tr.run_id = n.run_id AND tr.layer = n.layer AND tr.neuron = n.neuron AND tr.sign = 1 AND tr.rank = 0)
    ) ORDER BY k.ord), '[]')::text
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) WITH ORDINALITY AS k(layer, neuron, ord)
JOIN neurons n ON n.run_id = :run AND n.layer = k.layer AND n.neuron = k.neuron
""")


def search_json(session: Session, name: str, query: SearchQuery) -> str:
    """:func:`search` as the JSON text of a SearchPage: the API's search route sends it as it is."""
    run_id, rows, next_cursor, resolved = _page(session, name, query)
    items = "[]"
    if rows:
        items = str(session.execute(_SUMMARIES_JSON_SQL, {"run": run_id, "layers": [r.layer for r in rows],
                                                          "neurons": [r.neuron for r in rows],
                                                          "conv": query.projection}).scalar())
    tokens = json.dumps({k: v.model_dump() for k, v in resolved.items()})
    return f'{{"items": {items}, "next_cursor": {json.dumps(next_cursor)}, "resolved_tokens": {tokens}}}'


def filtered(session: Session, entry: Any, run: Any, query: SearchQuery) -> Select[Any]:
    """The neurons of ``run`` that pass every filter of ``query`` (its sort and cursor ignored), unordered:
    the review queue orders and limits this itself."""
    value_top = int((run.parameters or {}).get("value_top", 30))
    conds, joins, needs_search, _ = _conditions(session, run.id, entry.n_layers, value_top, entry.vocab_size,
                                                query, entry.id)
    return _base(conds, joins, needs_search)
