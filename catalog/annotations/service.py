"""Annotations: annotators and tokens, writing and revising annotations, the review queues, agreement.

Annotations belong to a catalog entry's neuron (model, layer, neuron), never to a run: a new run
deletes the old run's rows and leaves these. Each write records the run and weights hash it was
made on. Services never commit: the caller's session scope (CLI) or request session (API) does.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from datetime import UTC, datetime
from itertools import combinations
from typing import Literal

from sqlalchemy import BigInteger, ColumnElement, and_, exists, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from catalog.annotations import agreement as agree
from catalog.annotations import sessions
from catalog.annotations.schemas import (
    AgreementReport,
    AnnotationHistory,
    AnnotationRead,
    AnnotationWrite,
    KappaFigure,
    LayerAgreement,
    PairKappa,
    QueueItem,
    QueueLayer,
    RevisionRead,
    SuggestedMatch,
)
from catalog.read.catalog import require_run
from catalog.read.errors import Conflict, InvalidParameter, NotFound
from catalog.read.search import SearchQuery, filtered
from catalog.store.models import (
    Annotation,
    AnnotationRevision,
    Annotator,
    CatalogModel,
    ExtractionRun,
    Neuron,
    Trigger,
)

TOKEN_PREFIX = "nc_"
MAX_NAME = 100
# Seed 001's protocol: a fixed number of keys per layer (Geva et al. took 10 per layer).
DEFAULT_PER_LAYER = 10
# A pseudo-random but fixed order of the neurons within a layer (a bijection of neuron ids mod 2^32),
# so every annotator draws the same sample: blind double annotation without a stored sample.
_MIX = 2654435761
Queue = Literal["first", "second"]


# --- annotators -------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _valid_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(c.isspace() and c != " " for c in name) or "\x00" in name:
        raise InvalidParameter(f"name: give 1-{MAX_NAME} characters without tabs or newlines")
    return name


def add_annotator(session: Session, name: str) -> str:
    """Create annotator ``name`` (or give a token to one imported or revoked) and return their new token."""
    name = _valid_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    found = session.scalar(select(Annotator).where(Annotator.name == name).with_for_update())
    if found is not None and found.token_sha256 is not None and found.revoked_at is None:
        raise Conflict(f"annotator {name!r} already has a token; revoke it first to issue a new one")
    if found is None:
        session.add(Annotator(name=name, token_sha256=hash_token(token)))
    else:
        found.token_sha256, found.revoked_at = hash_token(token), None
    session.flush()
    return token


def revoke_annotator(session: Session, name: str) -> None:
    found = session.scalar(select(Annotator).where(Annotator.name == name).with_for_update())
    if found is None:
        raise NotFound(f"no annotator named {name!r}")
    if found.token_sha256 is None:
        raise Conflict(f"annotator {name!r} has no token to revoke")
    # The annotations stay; the name stays theirs, so a new token can be issued later.
    found.token_sha256, found.revoked_at = None, datetime.now(UTC)
    sessions.end_all(session, found.id)  # every signed-in browser of theirs is signed out too
    session.flush()


def list_annotators(session: Session) -> list[Annotator]:
    return list(session.scalars(select(Annotator).order_by(Annotator.name)))


def authenticate(session: Session, token: str | None) -> Annotator | None:
    """The active annotator holding ``token``, or None (unknown, revoked or no token)."""
    if not token or len(token) > 200:
        return None
    return session.scalar(select(Annotator).where(Annotator.token_sha256 == hash_token(token)))


# --- reading ----------------------------------------------------------------------------------


def _read(a: Annotation, model: str, annotator: str, current_weights: str | None) -> AnnotationRead:
    return AnnotationRead(
        model=model, layer=a.layer, neuron=a.neuron, annotator=annotator, revision=a.revision, label=a.label,
        description=a.description, examples=a.examples,  # type: ignore[arg-type]
        run_id=a.run_id, weights_sha256=a.weights_sha256,
        on_other_weights=a.weights_sha256 != current_weights, created_at=a.created_at, updated_at=a.updated_at,
    )


def _neuron(session: Session, model: str, layer: int, neuron: int) -> tuple[CatalogModel, ExtractionRun]:
    entry, run = require_run(session, model)
    if not 0 <= layer < entry.n_layers or not 0 <= neuron < entry.d_mlp:
        raise NotFound(f"catalog {model!r} has no neuron {layer}/{neuron} "
                       f"(layers 0-{entry.n_layers - 1}, neurons 0-{entry.d_mlp - 1})")
    return entry, run


def neuron_annotations(session: Session, model: str, layer: int, neuron: int) -> list[AnnotationRead]:
    """Every annotator's current annotation of one neuron, oldest first."""
    entry, run = _neuron(session, model, layer, neuron)
    rows = session.execute(
        select(Annotation, Annotator.name).join(Annotator, Annotator.id == Annotation.annotator_id)
        .where(Annotation.model_id == entry.id, Annotation.layer == layer, Annotation.neuron == neuron)
        .order_by(Annotation.created_at, Annotation.id)
    ).tuples().all()
    return [_read(a, model, name, run.weights_sha256) for a, name in rows]


# Blind first labelling, enforced wherever labels are read (README, "Annotations and the review UI"):
# one annotator's label, description or examples of a neuron are shown only to an annotator who has
# saved their own annotation of that neuron; readers without a token see none. Aggregates over many
# neurons (agreement, label shares per layer, queue counts) are not per-annotator labels.


def has_annotated(session: Session, model_id: int, layer: int, neuron: int, viewer: Annotator | None) -> bool:
    if viewer is None:
        return False
    return session.scalar(select(exists().where(
        Annotation.model_id == model_id, Annotation.layer == layer, Annotation.neuron == neuron,
        Annotation.annotator_id == viewer.id))) or False


def visible_annotations(session: Session, model: str, layer: int, neuron: int,
                        viewer: Annotator | None) -> tuple[list[AnnotationRead], int]:
    """(the current annotations of a neuron ``viewer`` may see, how many others are hidden): all of them
    once ``viewer`` has annotated the neuron, none before, none for a reader (``viewer`` None)."""
    every = neuron_annotations(session, model, layer, neuron)
    if viewer is not None and any(a.annotator == viewer.name for a in every):
        return every, 0
    return [], len(every)


def may_read_annotation(session: Session, model: str, layer: int, neuron: int, annotator: str,
                        viewer: Annotator | None) -> bool:
    """Whether ``viewer`` may read ``annotator``'s annotation (and revisions) of a neuron."""
    entry, _ = _neuron(session, model, layer, neuron)
    return viewer is not None and (viewer.name == annotator or has_annotated(session, entry.id, layer, neuron, viewer))


def history(session: Session, model: str, layer: int, neuron: int, annotator: str) -> AnnotationHistory:
    """One annotator's annotation of one neuron with every revision."""
    entry, run = _neuron(session, model, layer, neuron)
    row = session.execute(
        select(Annotation).join(Annotator, Annotator.id == Annotation.annotator_id)
        .where(Annotation.model_id == entry.id, Annotation.layer == layer, Annotation.neuron == neuron,
               Annotator.name == annotator)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{annotator!r} has not annotated {model}/{layer}/{neuron}")
    revs = session.scalars(
        select(AnnotationRevision).where(AnnotationRevision.annotation_id == row.id).order_by(AnnotationRevision.revision)
    ).all()
    return AnnotationHistory(
        annotation=_read(row, model, annotator, run.weights_sha256),
        revisions=[RevisionRead(revision=r.revision, label=r.label, description=r.description,
                                examples=r.examples,  # type: ignore[arg-type]
                                run_id=r.run_id, weights_sha256=r.weights_sha256, created_at=r.created_at)
                   for r in revs],
    )


# --- writing ----------------------------------------------------------------------------------


def _check_write(session: Session, run: ExtractionRun, layer: int, neuron: int, body: AnnotationWrite) -> list[dict[str, int]]:
    description = body.description.replace("\x00", "").strip()
    if body.label != "none" and not description:
        raise InvalidParameter(f"description: name the pattern the triggers share (required for label {body.label!r})")
    examples = [e.model_dump() for e in body.examples]
    if examples:
        pairs = {(e["document"], e["position"]) for e in examples}
        known = set(session.execute(
            select(Trigger.document, Trigger.position)
            .where(Trigger.run_id == run.id, Trigger.layer == layer, Trigger.neuron == neuron)
        ).tuples().all())
        unknown = sorted(pairs - known)
        if unknown:
            d, p = unknown[0]
            raise InvalidParameter(f"examples: (document {d}, position {p}) is not a trigger of neuron {layer}/{neuron}")
    return examples


def save(session: Session, *, model: str, layer: int, neuron: int, annotator: Annotator,
         body: AnnotationWrite) -> tuple[AnnotationRead, bool]:
    """Write ``annotator``'s first annotation of a neuron or a revision of it; (the annotation, created).

    A first write when one exists, or a revision whose base is not the latest, raises Conflict: two
    saves racing on one annotation cannot both win, and nothing is overwritten silently. Different
    annotators never touch each other's rows.
    """
    entry, run = _neuron(session, model, layer, neuron)
    examples = _check_write(session, run, layer, neuron, body)
    description = body.description.replace("\x00", "").strip()
    now = datetime.now(UTC)
    fields = {"label": body.label, "description": description, "examples": examples, "run_id": run.id,
              "weights_sha256": run.weights_sha256}
    key = and_(Annotation.model_id == entry.id, Annotation.layer == layer, Annotation.neuron == neuron,
               Annotation.annotator_id == annotator.id)
    if body.base_revision is None:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        annotation_id = session.scalar(
            pg_insert(Annotation)
            .values(model_id=entry.id, layer=layer, neuron=neuron, annotator_id=annotator.id, revision=1,
                    created_at=now, updated_at=now, **fields)
            .on_conflict_do_nothing(constraint="uq_annotations_neuron_annotator")
            .returning(Annotation.id)
        )
        if annotation_id is None:
            latest = session.scalar(select(Annotation.revision).where(key))
            raise Conflict(f"you have already annotated {layer}/{neuron} (revision {latest}); "
                           f"send base_revision {latest} to revise it")
        revision, created = 1, True
    else:
        got = session.execute(
            update(Annotation).where(key, Annotation.revision == body.base_revision)
            .values(revision=Annotation.revision + 1, updated_at=now, **fields)
            .returning(Annotation.id, Annotation.revision)
        ).first()
        if got is None:
            latest = session.scalar(select(Annotation.revision).where(key))
            if latest is None:
                raise Conflict(f"you have no annotation of {layer}/{neuron} to revise; send base_revision null")
            if body.base_revision > latest:  # not stale: a revision that never existed
                raise Conflict(f"revision {body.base_revision} does not exist: the latest is {latest} "
                               "(send base_revision from the annotation you read)")
            raise Conflict(f"revision {body.base_revision} is outdated: the latest is {latest} "
                           "(reload the neuron and edit that)")
        annotation_id, revision = got
        created = False
    session.execute(insert(AnnotationRevision).values(annotation_id=annotation_id, revision=revision,
                                                      created_at=now, **fields))
    session.flush()
    row = session.get_one(Annotation, annotation_id, populate_existing=True)
    return _read(row, model, annotator.name, run.weights_sha256), created


# --- review queues ----------------------------------------------------------------------------


def next_item(session: Session, model: str, annotator: Annotator, *, queue: Queue = "first",
              per_layer: int | None = DEFAULT_PER_LAYER, query: SearchQuery | None = None,
              skip: set[tuple[int, int]] | None = None) -> QueueItem:
    """The next neuron for ``annotator``.

    first: a fixed number of neurons per layer (``per_layer``; None = no limit), drawn in one fixed
    pseudo-random order per layer (the same for everyone), from the layer where I have done least,
    skipping what I annotated, among the neurons passing ``query``'s filters.
    second: neurons others annotated and I did not, fewest annotators first, then those whose human
    label disagrees with the suggested label, then the oldest.
    """
    entry, run = require_run(session, model)
    query = query or SearchQuery()
    if per_layer is not None and per_layer < 1:
        raise InvalidParameter("per_layer: must be at least 1")
    A = Annotation.__table__
    N = Neuron.__table__
    base = filtered(session, entry, run, query).subquery("candidate")
    mine_here: ColumnElement[bool] = exists(select(1).where(A.c.model_id == entry.id, A.c.layer == base.c.layer,
                                       A.c.neuron == base.c.neuron, A.c.annotator_id == annotator.id))
    if skip:  # skipped in this sitting (the UI's "n"): left for later, not annotated
        mine_here = mine_here | tuple_(base.c.layer, base.c.neuron).in_(sorted(skip)[:1000])
    counts = dict(session.execute(
        select(Annotation.layer, func.count()).where(Annotation.model_id == entry.id,
                                                     Annotation.annotator_id == annotator.id)
        .group_by(Annotation.layer)
    ).tuples().all())
    layers = _layers_in(entry.n_layers, query)
    progress = [QueueLayer(layer=layer, mine=counts.get(layer, 0), quota=per_layer) for layer in layers]
    if queue == "first":
        order = sorted(layers, key=lambda layer: (counts.get(layer, 0), layer))
        for layer in order:
            if per_layer is not None and counts.get(layer, 0) >= per_layer:
                continue
            hit = session.execute(
                select(base.c.layer, base.c.neuron).where(base.c.layer == layer, ~mine_here)
                .order_by(((func.cast(base.c.neuron, BigInteger) + layer * 7919 + 1) * _MIX) % (2**32), base.c.neuron)
                .limit(1)
            ).first()
            if hit is not None:
                return QueueItem(queue="first", layer=hit[0], neuron=hit[1], done=False, progress=progress)
        return QueueItem(queue="first", layer=None, neuron=None, done=True, progress=progress)
    others = (
        select(A.c.layer, A.c.neuron, func.count().label("n"), func.min(A.c.updated_at).label("first"),
               func.bool_or(A.c.label != func.coalesce(N.c.suggested_label, A.c.label)).label("disagrees"))
        .select_from(A.outerjoin(N, and_(N.c.run_id == run.id, N.c.layer == A.c.layer, N.c.neuron == A.c.neuron)))
        .where(A.c.model_id == entry.id, A.c.annotator_id != annotator.id)
        .group_by(A.c.layer, A.c.neuron)
        .subquery("others")
    )
    second = session.execute(
        select(base.c.layer, base.c.neuron, others.c.n)
        .join(others, and_(others.c.layer == base.c.layer, others.c.neuron == base.c.neuron))
        .where(~mine_here)
        .order_by(others.c.n, others.c.disagrees.desc(), others.c.first, base.c.layer, base.c.neuron)
        .limit(1)
    ).first()
    if second is None:
        return QueueItem(queue="second", layer=None, neuron=None, done=True, progress=progress)
    return QueueItem(queue="second", layer=second[0], neuron=second[1], done=False, progress=progress,
                     others=second[2])


def _layers_in(n_layers: int, query: SearchQuery) -> list[int]:
    lo = query.layer_min if query.layer_min is not None else 0
    hi = query.layer_max if query.layer_max is not None else n_layers - 1
    wanted = set(query.layers) if query.layers else set(range(n_layers))
    return [layer for layer in range(max(lo, 0), min(hi, n_layers - 1) + 1) if layer in wanted]


# --- agreement --------------------------------------------------------------------------------


def _kappa(labels: dict[tuple[int, int], dict[str, str]]) -> KappaFigure:
    items, raters, method, kappa, observed = agree.kappa_for(labels)
    return KappaFigure(items=items, annotators=raters, method=method, kappa=kappa,  # type: ignore[arg-type]
                       observed_agreement=observed)


def _match(pairs: list[tuple[str, str]]) -> SuggestedMatch:
    hits = sum(h == s for h, s in pairs)
    return SuggestedMatch(annotations=len(pairs), matches=hits, rate=hits / len(pairs) if pairs else None)


def agreement(session: Session, model: str) -> AgreementReport:
    """Kappa between annotators per layer and overall, pairwise Cohen's kappa, and how often the
    human label is the suggested label (current labels; 'none' never matches a suggested label)."""
    entry, run = require_run(session, model)
    rows = session.execute(
        select(Annotation.layer, Annotation.neuron, Annotator.name, Annotation.label, Neuron.suggested_label)
        .join(Annotator, Annotator.id == Annotation.annotator_id)
        .outerjoin(Neuron, and_(Neuron.run_id == run.id, Neuron.layer == Annotation.layer,
                                Neuron.neuron == Annotation.neuron))
        .where(Annotation.model_id == entry.id)
    ).tuples().all()
    labels: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    suggested: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for layer, neuron, name, label, sugg in rows:
        labels[(layer, neuron)][name] = label
        if sugg is not None:
            suggested[layer].append((label, sugg))
    by_layer: dict[int, dict[tuple[int, int], dict[str, str]]] = defaultdict(dict)
    for key, v in labels.items():
        by_layer[key[0]][key] = v
    layers = [LayerAgreement(layer=layer, between_annotators=_kappa(by_layer.get(layer, {})),
                             with_suggested=_match(suggested.get(layer, [])))
              for layer in sorted(set(by_layer) | set(suggested))]
    names = sorted({n for v in labels.values() for n in v})
    pairs = []
    for a, b in combinations(names, 2):
        both = [(v[a], v[b]) for v in labels.values() if a in v and b in v]
        if both:
            pairs.append(PairKappa(annotators=(a, b), items=len(both), kappa=agree.cohen_kappa(both)[0]))
    return AgreementReport(model=model, overall=_kappa(labels),
                           with_suggested=_match([p for ps in suggested.values() for p in ps]),
                           layers=layers, pairs=pairs)
