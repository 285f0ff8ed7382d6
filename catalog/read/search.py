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

Bounded patterns (part 6): a pattern that the lexeme sets decide alone (one word, words joined by
OR, a word repeated) needs nothing more. Any other needs the per-prefix check, and it is only run
on a bounded set: the prefixes that match (counted through the prefixes' GIN index with a LIMIT,
at most ``pattern_prefixes_max``; the neurons are then found from them through the triggers'
(document, position) index), else the candidate neurons of the lexeme sets (at most
``pattern_candidates_max``, each with at most top_n prefixes). Beyond both the pattern is refused
(422, "too broad") instead of running into the statement timeout. ``sort=relevance`` (the best
matching trigger's coefficient, descending) needs the same bound. Each hit of a pattern search
carries up to three matching triggers with the matched words' character spans, and every page the
number of neurons that pass (exact up to ``search_total_max``, the planner's estimate above).
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

from catalog.config import settings
from catalog.read.catalog import clean, require_run
from catalog.read.errors import InvalidParameter, Unauthorized
from catalog.read.schemas import (
    MatchingTrigger,
    NeuronSummary,
    ResolvedToken,
    SearchPage,
    TokenLogit,
    TopTrigger,
)
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
RELEVANCE = "relevance"  # with q only: the best matching trigger's coefficient, descending
MATCHING_TRIGGERS = 3
MAX_LIMIT = 500
MAX_Q = 500

N = Neuron.__table__
S = NeuronSearch.__table__
T = Trigger.__table__
P = Prefix.__table__
VT = ValueToken.__table__
A = Annotation.__table__
CONFIG: ColumnElement[Any] = literal_column(f"'{TEXT_SEARCH_CONFIG}'::regconfig")
_PHRASE_OP = re.compile(r"<(?:\d+|-)>")
_LEXEME = re.compile(r"'((?:[^']|'')+)'")
# Tokens of the default text-search parser that are followed by their parts (a hyphenated word, a
# URL): they take no room of their own when the parts' offsets are summed up.
_COMPOUND_TOKENS = "('asciihword', 'hword', 'numhword', 'url')"


@dataclass(frozen=True)
class _Pattern:
    full: str  # the query as tsquery text (per prefix)
    loose: str | None  # over a neuron's lexeme set; None when there is none (only exclusions)
    decided: bool  # the lexeme sets decide alone: no per-prefix check
    words: tuple[str, ...]  # the lexemes looked for (not excluded): highlighted in matching triggers


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
    # who asks (blind first labelling): annotators' labels and descriptions count only on neurons this
    # annotator has annotated too; None (a reader) may not filter by them at all
    viewer_id: int | None = None
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
    if sort == RELEVANCE:
        return _Order(RELEVANCE, True)
    key, descending = (sort[1:], True) if sort.startswith("-") else (sort, False)
    if key not in SORT_KEYS:
        raise InvalidParameter(f"sort: unknown figure {key!r}; one of {', '.join(SORT_KEYS)} ('-' for descending), "
                               f"or {RELEVANCE} (with q)")
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


def _pattern(session: Session, q: str) -> _Pattern:
    full, loose = _tsquery(session, q)
    words = tuple(dict.fromkeys(w.replace("''", "'") for w in _LEXEME.findall(loose or "")))
    ops = _LEXEME.sub("L", full)
    decided = False
    if loose is not None and "!" not in ops and "<" not in ops:
        if "&" not in ops:
            decided = True  # words joined by OR: some prefix has one iff the neuron's lexeme set has one
        elif "|" not in ops and len(set(_LEXEME.findall(full))) == 1:
            # the same word repeated ("a a a"): that word
            decided, full = True, _LEXEME.search(full).group(0)  # type: ignore[union-attr]
            loose = full
    return _Pattern(full, loose, decided, words)


def _count(session: Session, stmt: Select[Any], cap: int) -> int:
    """How many rows ``stmt`` has, counted up to cap + 1; through indexes (a sequential scan would not stop
    early when the rows are sparse)."""
    before = session.scalar(text("SELECT current_setting('enable_seqscan') || left(set_config('enable_seqscan', "
                                 "'off', true), 0)"))
    try:
        return int(session.scalar(select(func.count()).select_from(stmt.limit(cap + 1).subquery())) or 0)
    finally:
        session.execute(text("SELECT set_config('enable_seqscan', :v, true)"), {"v": before})


def _prefix_match(full: str) -> ColumnElement[bool]:
    return P.c.tsv.op("@@")(cast(full, TSQUERY))


@dataclass
class _Plan:
    """How a pattern is served: the relevance of a hit (the best matching trigger's coefficient), if asked."""

    pattern: _Pattern
    relevance: Any = None
    hits: Any = None  # the neurons of the matching prefixes (a subquery), when they are few enough to list


def _plan_pattern(session: Session, run_id: int, q: str, pat: _Pattern, described: list[tuple[int, int]],
                  conds: list[ColumnElement[bool]], joins: list[Any], needs_search: bool | None,
                  relevance: bool) -> tuple[bool | None, _Plan]:
    """Add the pattern's conditions (and joins) within the bounds; returns needs_search and the plan."""
    plan = _Plan(pat)
    loose = S.c.terms.op("@@")(cast(pat.loose, TSQUERY)) if pat.loose is not None else None
    exact = exists(
        select(1).select_from(T.join(P, and_(P.c.run_id == T.c.run_id, P.c.document == T.c.document,
                                              P.c.position == T.c.position)))
        .where(T.c.run_id == N.c.run_id, T.c.layer == N.c.layer, T.c.neuron == N.c.neuron, T.c.sign == 1,
               _prefix_match(pat.full))
    )
    pattern: list[ColumnElement[bool]] | None = None
    if pat.decided and not relevance:
        pattern = [loose]  # type: ignore[list-item]  # one word needs no second look: the lexeme set says it all
    else:
        pmax, cmax = settings.pattern_prefixes_max, settings.pattern_candidates_max
        prefixes = (_count(session, select(P.c.document).where(P.c.run_id == run_id, _prefix_match(pat.full)), pmax)
                    if pat.loose is not None else pmax + 1)
        if prefixes <= pmax:
            # Few prefixes match: the neurons come from them (triggers' (document, position) index), each with
            # its best matching coefficient; no lexeme set or per-neuron check is needed.
            hits = (select(T.c.layer, T.c.neuron, func.max(T.c.coefficient).label("relevance"))
                    .select_from(P.join(T, and_(T.c.run_id == P.c.run_id, T.c.document == P.c.document,
                                                T.c.position == P.c.position)))
                    .where(P.c.run_id == run_id, T.c.sign == 1, _prefix_match(pat.full))
                    .group_by(T.c.layer, T.c.neuron).subquery("matched"))
            plan.relevance, plan.hits = hits.c.relevance, hits
            if described:
                joins.append(("outer", hits))
                conds.append(or_(hits.c.layer.is_not(None), tuple_(N.c.layer, N.c.neuron).in_(described)))
            else:
                joins.append(hits)
            return needs_search, plan
        candidates = [*conds, *([loose] if loose is not None else [])]
        n = _count(session, _base(candidates, joins, True if loose is not None else needs_search), cmax)
        if n > cmax:
            what = "sort=relevance: q" if pat.decided else "q"
            raise InvalidParameter(
                f"{what}: too broad: {q!r} matches more than {pmax:,} trigger prefixes and more than {cmax:,} "
                "neurons' trigger words; add a rarer word or narrow the search (e.g. by layer)")
        pattern = [*([loose] if loose is not None else []), *([] if pat.decided else [exact])]
        plan.relevance = (
            select(T.c.coefficient)
            .select_from(T.join(P, and_(P.c.run_id == T.c.run_id, P.c.document == T.c.document,
                                        P.c.position == T.c.position)))
            .where(T.c.run_id == N.c.run_id, T.c.layer == N.c.layer, T.c.neuron == N.c.neuron, T.c.sign == 1,
                   _prefix_match(pat.full))
            .order_by(T.c.rank).limit(1).scalar_subquery()
        )
    uses_search = loose is not None
    # Annotation descriptions match too (part 4). They are few (people write them), so the
    # matching neurons are listed first and the prefix plan stays as it was when none match.
    if described:
        conds.append(or_(and_(*pattern), tuple_(N.c.layer, N.c.neuron).in_(described)))
        if uses_search and needs_search is not True:
            needs_search = None  # outer join: a described neuron may lack search terms
    else:
        conds.extend(pattern)
        if uses_search:
            needs_search = True
    return needs_search, plan


def _annotated_by(model_id: int, *where: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists(select(1).where(A.c.model_id == model_id, A.c.layer == N.c.layer, A.c.neuron == N.c.neuron,
                                  *where))


def _description_matches(session: Session, model_id: int, full: str, viewer_id: int | None) -> list[tuple[int, int]]:
    """(layer, neuron) of the neurons whose annotation descriptions match the tsquery ``full``, among
    those the viewer has annotated (blind first labelling; none for a reader)."""
    if viewer_id is None:
        return []
    mine = A.alias("mine")
    return [tuple(r) for r in session.execute(  # type: ignore[misc]
        select(A.c.layer, A.c.neuron).distinct()
        .where(A.c.model_id == model_id, func.to_tsvector(CONFIG, A.c.description).op("@@")(cast(full, TSQUERY)),
               exists(select(1).where(mine.c.model_id == model_id, mine.c.layer == A.c.layer,
                                      mine.c.neuron == A.c.neuron, mine.c.annotator_id == viewer_id)))
    ).all()]


def _blind(param: str, viewer_id: int | None) -> None:
    if viewer_id is None:
        raise Unauthorized(f"{param}: annotators' labels stay hidden until you label a neuron yourself (blind first "
                           "labelling); send your annotator token (Authorization: Bearer <token>) to filter by them")


def _conditions(session: Session, run_id: int, n_layers: int, value_top: int, vocab: int,
                query: SearchQuery, model_id: int = 0,
                ) -> tuple[list[ColumnElement[bool]], list[Any], bool | None, dict[str, ResolvedToken], _Plan | None]:
    """WHERE conditions on N (and S when the third value is True, outer-joined when it is None),
    subqueries of (layer, neuron) to join (("outer", subquery) for an outer join), the tokens resolved,
    and how the pattern is served (None without q)."""
    conds: list[ColumnElement[bool]] = [N.c.run_id == run_id]
    joins: list[Any] = []
    pat: _Pattern | None = None
    described: list[tuple[int, int]] = []
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
        pat = _pattern(session, q)
        described = _description_matches(session, model_id, pat.full, query.viewer_id)
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
        _blind("human_label", query.viewer_id)
        conds.append(_annotated_by(model_id, A.c.label == query.human_label))
    if query.annotated is not None:
        conds.append(_annotated_by(model_id) if query.annotated else ~_annotated_by(model_id))
    if query.annotator is not None:
        _blind("annotator", query.viewer_id)  # before the lookup: a reader learns no annotator names
        annotator_id = session.scalar(select(Annotator.id).where(Annotator.name == query.annotator))
        if annotator_id is None:
            raise InvalidParameter(f"annotator: no annotator named {query.annotator!r}")
        conds.append(_annotated_by(model_id, A.c.annotator_id == annotator_id))
    if query.viewer_id is not None and (query.human_label is not None or query.annotator is not None):
        conds.append(_annotated_by(model_id, A.c.annotator_id == query.viewer_id))  # only what I may see
    plan = None
    if pat is not None:  # last: its bounds are counted under every other filter
        needs_search, plan = _plan_pattern(session, run_id, clean_arg(query.q or "").strip(), pat, described, conds,
                                           joins, needs_search, query.sort == RELEVANCE)
    return conds, joins, needs_search, resolved, plan


def _base(conds: list[ColumnElement[bool]], joins: list[Any], needs_search: bool | None) -> Select[Any]:
    cols = [N.c.layer, N.c.neuron, *(N.c[s] for s in NEURON_STATS), N.c.suggested_label]
    source: Any = N
    if needs_search is not False:
        on = and_(S.c.run_id == N.c.run_id, S.c.layer == N.c.layer, S.c.neuron == N.c.neuron)
        source = source.join(S, on) if needs_search else source.outerjoin(S, on)
    for sub in joins:
        outer = isinstance(sub, tuple)
        sub = sub[1] if outer else sub
        on = and_(sub.c.layer == N.c.layer, sub.c.neuron == N.c.neuron)
        source = source.outerjoin(sub, on) if outer else source.join(sub, on)
    return select(*cols).select_from(source).where(*conds)


def _counted(run_id: int, conds: list[ColumnElement[bool]], joins: list[Any], needs_search: bool | None,
             base: Select[Any], hits: Any = None) -> Select[Any]:
    """What a page's total counts: ``base``, or, when every filter is on the neurons' search rows (a word,
    a trigger or next token), those rows alone: each has its neuron, so the count is the same without
    a join per match (a word in 8,060 neurons: 27 ms to count with the join at GPT-2-XL scale); or,
    when the only filter is a pattern served by its matching prefixes, their neurons (``hits``)."""
    rest = conds[1:]  # conds[0]: the neurons' run
    if hits is not None and joins == [hits] and not rest and needs_search is False:
        return select(hits.c.layer, hits.c.neuron)
    if needs_search is not True or joins or not rest:
        return base
    alone = select(S.c.layer, S.c.neuron).where(S.c.run_id == run_id, *rest)
    # a filter on anything else (the neurons' figures or layer, annotations) would add its table
    return alone if alone.get_final_froms() == [S] else base


def _fetch_relevance(session: Session, base: Select[Any], relevance: Any, after: _Cursor | None,
                     n: int) -> list[tuple[str, Any]]:
    """:func:`_fetch` for sort=relevance, descending (ties by (layer, neuron) descending); hits without a
    matching trigger (an annotation description matched) last in (layer, neuron) order."""
    # OFFSET 0 keeps the subquery whole: flattened, the relevance subquery would run once per mention
    hits = base.add_columns(relevance.label(RELEVANCE)).offset(0).subquery("hits")
    c = hits.c
    rows: list[tuple[str, Any]] = []
    if after is None or after.phase == "v":
        stmt = select(hits).where(c.relevance.is_not(None))
        if after is not None:
            stmt = stmt.where(tuple_(c.relevance, c.layer, c.neuron) < (after.value, after.layer, after.neuron))
        rows = [("v", r) for r in session.execute(
            stmt.order_by(c.relevance.desc(), c.layer.desc(), c.neuron.desc()).limit(n)).all()]
    if len(rows) < n:
        stmt = select(hits).where(c.relevance.is_(None))
        if after is not None and after.phase == "n":
            stmt = stmt.where(tuple_(c.layer, c.neuron) > (after.layer, after.neuron))
        rows += [("n", r) for r in session.execute(stmt.order_by(c.layer, c.neuron).limit(n - len(rows))).all()]
    return rows


def _plan_rows(got: Any) -> int:
    """The row estimate of an ``EXPLAIN (FORMAT JSON)`` answer."""
    explained = json.loads(got) if isinstance(got, str) else got
    return int(explained[0]["Plan"]["Plan Rows"])


def _estimate(session: Session, base: Select[Any]) -> int:
    """The planner's estimate of how many rows ``base`` has."""
    compiled = base.compile(dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True})
    return _plan_rows(session.connection().exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled),
                                                           compiled.params).scalar())


# A search whose q the neurons' lexeme sets decide alone (a word, or words joined by OR) is estimated
# before it is counted when the lexemes alone are estimated to match many neurons: the lexeme-set
# index cannot stop a count early (a bitmap of every match is built first: 35 ms for "the" on
# SmolLM2's 46,080 neurons, 41 ms at GPT-2-XL scale), and its estimate comes from the lexemes' own
# statistics (exact for every single word measured on SmolLM2). Above this many times
# search_total_max the estimate is the answer. The first look plans one table (0.3 ms); the whole
# search's plan costs 2.7 ms at GPT-2-XL scale, too much for every rare word.
_ESTIMATE_FIRST_ABOVE = 2


def _broad_lexemes(session: Session, run_id: int, loose: str) -> bool:
    """Whether the planner expects the lexeme query ``loose`` to match over _ESTIMATE_FIRST_ABOVE x
    search_total_max of the run's neurons."""
    return _plan_rows(session.execute(text(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM neuron_search WHERE run_id = :r AND terms @@ CAST(:q AS tsquery)"),
        {"r": run_id, "q": loose}).scalar()) > _ESTIMATE_FIRST_ABOVE * settings.search_total_max


def _total(session: Session, base: Select[Any], estimate_first: bool = False) -> tuple[int | None, bool | None]:
    """(how many neurons pass the filters, whether that is exact): counted up to search_total_max, above it
    the planner's estimate; ``estimate_first``: no count where the estimate is far above it."""
    bound = settings.search_total_max
    if bound <= 0:
        return None, None
    estimate = _estimate(session, base) if estimate_first else None
    if estimate is not None and estimate > _ESTIMATE_FIRST_ABOVE * bound:
        return estimate, False
    n = _count(session, base, bound)
    if n <= bound:
        return n, True
    return max(bound + 1, estimate if estimate is not None else _estimate(session, base)), False


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


# A page's stored parts (catalog/store/search_index.py): its top tokens in the page's convention and
# its strongest trigger, as JSON, one primary-key probe per hit.
_STORED_SQL = text("""
SELECT k.layer, k.neuron, CASE WHEN :conv = 'folded' THEN s.top_tokens_folded ELSE s.top_tokens_raw END, s.top_trigger
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) AS k(layer, neuron)
JOIN neuron_summaries s ON s.run_id = :run AND s.layer = k.layer AND s.neuron = k.neuron
""")


# The [start, end) character spans, as a JSON array, of the words of ``{text}`` whose lexemes are among
# :words. The tokens come from the configuration's parser in order (ts_parse), their lengths summed
# up, so the offsets are Postgres' own reading of the words; each token's lexemes are its first
# dictionary's (ts_lexize), as to_tsvector gives them ('simple' maps each token type to one
# dictionary). ts_debug answers the same and is six times slower (a SQL function joining catalogs
# per token): it was most of a rare word's search at GPT-2-XL scale. The parser, the token types
# followed by their parts and each type's dictionary are parameters (``_parser_params``).
_SPANS_JSON = """(
    SELECT coalesce(json_agg(json_build_array(d.pos, d.pos + length(d.token)) ORDER BY d.pos), '[]')
    FROM (SELECT x.tokid, x.token,
                 coalesce(sum(length(x.token)) FILTER (WHERE x.tokid <> ALL (CAST(:ts_compound AS int[])))
                          OVER (ORDER BY x.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS pos
          FROM ts_parse(CAST(:ts_parser AS oid), {text}) WITH ORDINALITY AS x(tokid, token, ord)) d
    WHERE d.tokid <> ALL (CAST(:ts_compound AS int[]))
      AND ts_lexize(CAST((CAST(:ts_dicts AS oid[]))[d.tokid] AS regdictionary), d.token) && CAST(:words AS text[]))"""

# Per database: the configuration's parser, its token types that are followed by their parts, and
# each token type's first dictionary (null: a type it does not index). Constants of the database,
# read once per server process: looked up in the catalogs per snippet they were a quarter of a
# common word's snippets (7.4 -> 5.5 ms for a page of 50 on SmolLM2).
_PARSER: dict[str, dict[str, Any]] = {}


def _parser_params(session: Session) -> dict[str, Any]:
    key = str(session.get_bind().engine.url)
    if key not in _PARSER:
        parser, compound = session.execute(text(
            f"SELECT c.cfgparser::oid::int, (SELECT array_agg(t.tokid ORDER BY t.tokid) FROM ts_token_type(c.cfgparser) t "
            f"WHERE t.alias IN {_COMPOUND_TOKENS}) FROM pg_ts_config c WHERE c.oid = '{TEXT_SEARCH_CONFIG}'::regconfig"
        )).one()
        types = session.scalar(text("SELECT max(tokid) FROM ts_token_type(CAST(:p AS oid))"), {"p": parser})
        dicts: dict[int, int] = dict(session.execute(text(
            f"SELECT maptokentype, mapdict::oid::int FROM pg_ts_config_map "
            f"WHERE mapcfg = '{TEXT_SEARCH_CONFIG}'::regconfig AND mapseqno = 1")).tuples().all())
        _PARSER[key] = {"ts_parser": int(parser), "ts_compound": list(compound or []),
                        "ts_dicts": [dicts.get(t) for t in range(1, int(types) + 1)]}
    return _PARSER[key]


# A hit's matching triggers as JSON (``{o}``: the row with its layer and neuron; :run, :full, :words):
# up to MATCHING_TRIGGERS of its positive triggers whose prefix matches q, strongest first, each with
# the spans of the words looked for.
_MATCHING_JSON = f"""coalesce((
    SELECT json_agg(json_build_object('text', m.text, 'activation', m.coefficient, 'next_token', m.next_token,
                                      'spans', {_SPANS_JSON.format(text="m.text")}) ORDER BY m.rank)
    FROM (SELECT tr.rank, tr.coefficient, p.text, nt.text AS next_token
          FROM triggers tr
          JOIN prefixes p ON p.run_id = tr.run_id AND p.document = tr.document AND p.position = tr.position
          LEFT JOIN tokens nt ON nt.run_id = p.run_id AND nt.token_id = p.next_token_id
          WHERE tr.run_id = :run AND tr.layer = {{o}}.layer AND tr.neuron = {{o}}.neuron AND tr.sign = 1
            AND p.tsv @@ CAST(:full AS tsquery)
          ORDER BY tr.rank LIMIT {MATCHING_TRIGGERS}) m), '[]')"""
_MATCHING_SQL = text(f"""
SELECT k.layer, k.neuron, ({_MATCHING_JSON.format(o="k")})::text
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) AS k(layer, neuron)
""")


def _summaries(session: Session, run_id: int, rows: list[Any], projection: str = "raw",
               pattern: _Pattern | None = None) -> list[NeuronSummary]:
    """The page's neurons with their five top tokens and strongest trigger (stored: one query for the page)."""
    if not rows:
        return []
    keys = {"run": run_id, "layers": [r.layer for r in rows], "neurons": [r.neuron for r in rows], "conv": projection}
    tokens: dict[tuple[int, int], list[TokenLogit]] = {}
    top: dict[tuple[int, int], TopTrigger] = {}
    for layer, neuron, top_tokens, top_trigger in session.execute(_STORED_SQL, keys).tuples():
        tokens[(layer, neuron)] = [TokenLogit.model_validate(t) for t in top_tokens]
        if top_trigger is not None:
            top[(layer, neuron)] = TopTrigger.model_validate(top_trigger)
    matching: dict[tuple[int, int], list[MatchingTrigger]] = {}
    if pattern is not None:
        for layer, neuron, got in session.execute(_MATCHING_SQL, {**keys, **_parser_params(session),
                                                                 "full": pattern.full,
                                                                 "words": list(pattern.words)}).tuples():
            matching[(layer, neuron)] = [MatchingTrigger.model_validate(m) for m in json.loads(got)]
    out = []
    for r in rows:
        fields = {s: clean(getattr(r, s)) for s in NEURON_STATS}
        out.append(NeuronSummary(layer=r.layer, neuron=r.neuron, suggested_label=r.suggested_label,
                                 top_tokens=tokens.get((r.layer, r.neuron), []), top_trigger=top.get((r.layer, r.neuron)),
                                 matching_triggers=matching.get((r.layer, r.neuron)) if pattern is not None else None,
                                 **fields))
    return out


@dataclass
class _PageRows:
    run_id: int
    rows: list[Any]
    next_cursor: str | None
    resolved: dict[str, ResolvedToken]
    pattern: _Pattern | None
    total: int | None
    total_exact: bool | None


def _page(session: Session, name: str, query: SearchQuery) -> _PageRows:
    """The rows of one search page, its next cursor, the tokens resolved, the pattern and the total."""
    entry, run = require_run(session, name)
    if not 1 <= query.limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit: must be 1-{MAX_LIMIT}")
    order = _order(query.sort)
    if query.projection not in PROJECTIONS:
        raise InvalidParameter(f"projection: one of {', '.join(PROJECTIONS)}")
    fingerprint = hashlib.sha256(f"{name}\n{query.fingerprint()}".encode()).hexdigest()[:16]
    after = decode_cursor(query.cursor, run.id, fingerprint) if query.cursor else None
    value_top = int((run.parameters or {}).get("value_top", 30))
    if order.key == RELEVANCE and query.q is None:
        raise InvalidParameter(f"sort: {RELEVANCE} needs q (it orders by the best trigger matching q)")
    conds, joins, needs_search, resolved, plan = _conditions(session, run.id, entry.n_layers, value_top,
                                                             entry.vocab_size, query, entry.id)
    base = _base(conds, joins, needs_search)
    if order.key == RELEVANCE:
        assert plan is not None and plan.relevance is not None
        rows = _fetch_relevance(session, base, plan.relevance, after, query.limit + 1)
    else:
        rows = _fetch(session, base, order, after, query.limit + 1)
    page, more = rows[: query.limit], len(rows) > query.limit
    next_cursor = None
    if more:
        phase, last = page[-1]
        # the layer sort keeps its key in (layer, neuron); the value slot then just repeats the layer
        value = float(last.layer) if order.key == "layer" else None if phase == "n" else float(getattr(last, order.key))
        next_cursor = encode_cursor(run.id, fingerprint, _Cursor(phase, value if phase == "v" else None,
                                                                 last.layer, last.neuron))
    total: int | None
    exact: bool | None
    if after is None and not more:
        total, exact = len(page), True  # one page holds them all: no count needed
    else:
        broad = (plan is not None and plan.pattern.decided and plan.relevance is None and plan.pattern.loose is not None
                 and settings.search_total_max > 0 and _broad_lexemes(session, run.id, plan.pattern.loose))
        counted = _counted(run.id, conds, joins, needs_search, base, plan.hits if plan else None)
        # A pattern's matching prefixes can be the triggers of many neurons, and counting them aggregates
        # every one ("a person": 102,750 triggers of 87,567 neurons, 130 ms at GPT-2-XL scale): far above
        # the bound, the planner's estimate of the aggregate is the total (43,561 there), as for a word.
        by_prefixes = plan is not None and plan.hits is not None and counted is not base
        total, exact = _total(session, counted, estimate_first=broad or by_prefixes)
    return _PageRows(run.id, [r for _, r in page], next_cursor, resolved, plan.pattern if plan else None, total, exact)


def search(session: Session, name: str, query: SearchQuery) -> SearchPage:
    """One page of the neurons of ``name``'s current run that pass every filter of ``query``."""
    p = _page(session, name, query)
    return SearchPage(items=_summaries(session, p.run_id, p.rows, query.projection, p.pattern), next_cursor=p.next_cursor,
                      resolved_tokens=p.resolved, total=p.total, total_exact=p.total_exact)


def _num(column: str) -> str:
    return f"CASE WHEN {column} = 'NaN'::float8 THEN NULL ELSE {column} END"  # clean(): NaN shows as null


# The page's NeuronSummary items, in page order, as JSON text built by Postgres in one statement
# (what _summaries assembles from one or two queries and pydantic), the stored parts as they are.
_SUMMARIES_JSON = f"""
SELECT coalesce(json_agg(json_build_object(
    {", ".join(f"'{f}', {_num('n.' + f)}" for f in NEURON_STATS)}, 'suggested_label', n.suggested_label,
    'layer', n.layer, 'neuron', n.neuron,
    'top_tokens', CASE WHEN :conv = 'folded' THEN s.top_tokens_folded ELSE s.top_tokens_raw END,
    'top_trigger', s.top_trigger,
    'matching_triggers', {{matching}}
    ) ORDER BY k.ord), '[]')::text
FROM unnest(CAST(:layers AS smallint[]), CAST(:neurons AS int[])) WITH ORDINALITY AS k(layer, neuron, ord)
JOIN neurons n ON n.run_id = :run AND n.layer = k.layer AND n.neuron = k.neuron
JOIN neuron_summaries s ON s.run_id = n.run_id AND s.layer = n.layer AND s.neuron = n.neuron
"""
_SUMMARIES_JSON_SQL = text(_SUMMARIES_JSON.format(matching="NULL"))
_SUMMARIES_MATCHING_JSON_SQL = text(_SUMMARIES_JSON.format(matching=_MATCHING_JSON.format(o="n")))


def search_json(session: Session, name: str, query: SearchQuery) -> str:
    """:func:`search` as the JSON text of a SearchPage: the API's search route sends it as it is."""
    p = _page(session, name, query)
    items = "[]"
    if p.rows:
        params = {"run": p.run_id, "layers": [r.layer for r in p.rows], "neurons": [r.neuron for r in p.rows],
                  "conv": query.projection}
        if p.pattern is not None:
            params.update(full=p.pattern.full, words=list(p.pattern.words), **_parser_params(session))
        stmt = _SUMMARIES_MATCHING_JSON_SQL if p.pattern is not None else _SUMMARIES_JSON_SQL
        items = str(session.execute(stmt, params).scalar())
    tokens = json.dumps({k: v.model_dump() for k, v in p.resolved.items()})
    return (f'{{"items": {items}, "next_cursor": {json.dumps(p.next_cursor)}, "resolved_tokens": {tokens}, '
            f'"total": {json.dumps(p.total)}, "total_exact": {json.dumps(p.total_exact)}}}')


def filtered(session: Session, entry: Any, run: Any, query: SearchQuery) -> Select[Any]:
    """The neurons of ``run`` that pass every filter of ``query`` (its sort and cursor ignored), unordered:
    the review queue orders and limits this itself."""
    value_top = int((run.parameters or {}).get("value_top", 30))
    conds, joins, needs_search, _, _ = _conditions(session, run.id, entry.n_layers, value_top, entry.vocab_size,
                                                   query, entry.id)
    return _base(conds, joins, needs_search)
