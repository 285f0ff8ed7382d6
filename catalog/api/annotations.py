"""Routes under /api/v1 for annotations (part 4): reading is open, writing needs an annotator's token
(``Authorization: Bearer <token>``, from `neuron-catalog users add NAME`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from catalog.annotations import service, transfer
from catalog.annotations.schemas import (
    AgreementReport,
    AnnotationHistory,
    AnnotationRead,
    AnnotationWrite,
    QueueItem,
)
from catalog.api.deps import SessionDep, ViewerDep, WriteSessionDep, bearer
from catalog.api.routes import ERRORS, LayerIndex, ModelName, NeuronIndex, SearchParams, search_query
from catalog.read.errors import Forbidden, Unauthorized
from catalog.read.schemas import ErrorBody
from catalog.store.models import Annotator

WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {"model": ErrorBody, "description": "No token, or a token that is unknown or revoked."},
    403: {"model": ErrorBody, "description": "The annotation is another annotator's, another annotator's "
                                             "label is hidden (blind first labelling), or a cross-origin request."},
    409: {"model": ErrorBody, "description": "Stale base_revision, or a first annotation where one exists."},
}
router = APIRouter(responses=WRITE_ERRORS, tags=["annotations"])
AnnotatorName = Annotated[str, Field(min_length=1, max_length=100)]


def current_annotator(session: WriteSessionDep, token: Annotated[str | None, Depends(bearer)]) -> Annotator:
    who = service.authenticate(session, token)
    if who is None:
        raise Unauthorized("writing needs a valid annotator token (Authorization: Bearer <token>); "
                                   "`neuron-catalog users add NAME` prints one")
    return who


def reviewer(session: SessionDep, token: Annotated[str | None, Depends(bearer)]) -> Annotator:
    who = service.authenticate(session, token)
    if who is None:
        raise Unauthorized("the review queue is per annotator: send your token (Authorization: Bearer <token>)")
    return who


AnnotatorDep = Annotated[Annotator, Depends(current_annotator)]
ReviewerDep = Annotated[Annotator, Depends(reviewer)]
BLIND = ("blind first labelling: save your own annotation of this neuron before reading others' "
         "(send your token: Authorization: Bearer <token>)")
NEURON = "/models/{model}/neurons/{layer}/{neuron}/annotations"


@router.get(NEURON, response_model=list[AnnotationRead], responses={200: {"headers": {"X-Hidden-Annotations": {
    "description": "How many annotations of the neuron are not shown (blind first labelling).",
    "schema": {"type": "integer"}}}}})
def list_annotations(model: ModelName, layer: LayerIndex, neuron: NeuronIndex, session: SessionDep, me: ViewerDep,
                     response: Response) -> list[AnnotationRead]:
    """Every annotator's current annotation of one neuron, once I (my token) have annotated it myself;
    before that, and without a token, none (blind first labelling): the header X-Hidden-Annotations says
    how many there are."""
    shown, hidden = service.visible_annotations(session, model, layer, neuron, me)
    response.headers["X-Hidden-Annotations"] = str(hidden)
    return shown


@router.put(NEURON + "/{annotator}", response_model=AnnotationRead, status_code=200,
            responses={201: {"model": AnnotationRead, "description": "The first annotation was written."}})
def write_annotation(model: ModelName, layer: LayerIndex, neuron: NeuronIndex, annotator: AnnotatorName,
                     body: AnnotationWrite, session: WriteSessionDep, me: AnnotatorDep,
                     response: Response) -> AnnotationRead:
    """Write my first annotation of a neuron (base_revision null) or revise it (base_revision = its latest
    revision). Only the annotator named in the path, with their own token, may write it."""
    if annotator != me.name:
        raise Forbidden(f"this is {annotator!r}'s annotation; you are signed in as {me.name!r}")
    saved, created = service.save(session, model=model, layer=layer, neuron=neuron, annotator=me, body=body)
    response.status_code = 201 if created else 200
    return saved


@router.get(NEURON + "/{annotator}/revisions", response_model=AnnotationHistory)
def revisions(model: ModelName, layer: LayerIndex, neuron: NeuronIndex, annotator: AnnotatorName,
              session: SessionDep, me: ViewerDep) -> AnnotationHistory:
    """One annotator's annotation of one neuron with every revision, oldest first: my own, or another's
    once I have annotated the neuron myself (blind first labelling; needs my token)."""
    if me is None:
        raise Unauthorized(BLIND)
    if not service.may_read_annotation(session, model, layer, neuron, annotator, me):
        raise Forbidden(BLIND)
    return service.history(session, model, layer, neuron, annotator)


_queue_fields: dict[str, Any] = {
    name: (f.annotation, f) for name, f in SearchParams.model_fields.items() if name not in ("sort", "limit", "cursor")
}
_queue_fields.update({
    "queue": (Literal["first", "second"], Field("first", description=(
        "first: my next neuron of the per-layer sample; second: neurons others annotated and I did not."))),
    "per_layer": (int | None, Field(service.DEFAULT_PER_LAYER, ge=1, le=1_000_000, description=(
        "First-opinion queue: neurons drawn per layer (seed 001 takes a fixed number per layer)."))),
})
QueueParams: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "QueueParams", __config__=ConfigDict(extra="forbid"), **_queue_fields
)


@router.get("/models/{model}/queue/next", response_model=QueueItem)
def queue_next(model: ModelName, params: Annotated[QueueParams, Query()], session: SessionDep,  # type: ignore[valid-type]
               me: ReviewerDep) -> QueueItem:
    """The next neuron of my review queue, optionally among the neurons passing any search filter."""
    p = params.model_dump()  # type: ignore[attr-defined]
    return service.next_item(session, model, me, queue=p["queue"], per_layer=p["per_layer"], query=search_query(p, viewer_id=me.id))


@router.get("/models/{model}/agreement", response_model=AgreementReport)
def agreement(model: ModelName, session: SessionDep) -> AgreementReport:
    """Cohen's (two annotators) or Fleiss' (more) kappa per layer and overall, pairwise kappas, and how often
    the human label matches the suggested label."""
    return service.agreement(session, model)


@router.get("/models/{model}/annotations/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}},
                             "description": "One row per revision."}})
def export_annotations(model: ModelName, session: SessionDep, me: ViewerDep,
                       format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl") -> StreamingResponse:
    """Every revision of the annotations of this model that I may read (needs my token): those of the
    neurons I have annotated, mine and others' (blind first labelling), as JSONL or CSV
    (`neuron-catalog annotations import` reads either back). The CLI's export has every annotation."""
    if me is None:
        raise Unauthorized("the export holds annotators' labels: send your token (Authorization: Bearer <token>); "
                           "`neuron-catalog annotations export` exports every annotation")
    items = list(transfer.rows(session, model, visible_to=me.id))  # read inside the request's session
    body = transfer.to_jsonl(items) if format == "jsonl" else transfer.to_csv(items)
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return StreamingResponse(body, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="annotations.{format}"'})
