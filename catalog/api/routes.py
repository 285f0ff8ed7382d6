"""Routes under /api/v1: argument mapping onto catalog.read, nothing else."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from catalog.api.deps import SessionDep, ViewerDep
from catalog.read import catalog, search, vectors
from catalog.read.errors import InvalidParameter
from catalog.read.schemas import (
    STAT_MEANINGS,
    TOKEN_ORDERS,
    ErrorBody,
    LayerInfo,
    ModelInfo,
    NeuronRecord,
    Page,
    RunInfo,
    SearchPage,
    SimilarPage,
    TokenOrder,
    TokenRanking,
)
from catalog.store.models import HUMAN_LABELS, LABELS, NEURON_STATS, PROJECTIONS

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The request body could not be read (not JSON)."},
    404: {"model": ErrorBody, "description": "Unknown model (catalog entry) or neuron."},
    409: {"model": ErrorBody, "description": "The catalog lacks what this needs (e.g. extracted before the "
          "feature existed; the model cannot be loaded for a probe)."},
    422: {"model": ErrorBody, "description": "Invalid parameters; the detail names the parameter."},
    429: {"model": ErrorBody, "description": "Too many requests from this client, or the expensive searches "
          "are all busy; retry after the Retry-After header's seconds (catalog/api/limits.py)."},
    503: {"model": ErrorBody, "description": "No catalog yet, database unreachable, or the query timed out."},
}
router = APIRouter(responses=ERRORS)

ModelName = Annotated[str, Path(max_length=200, description="Catalog entry name (GET /models lists them).")]
LayerIndex = Annotated[int, Path(ge=0, le=32767, description="0-based layer.")]
NeuronIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="0-based neuron within the layer.")]
LayerBound = Annotated[int | None, Query(ge=0, le=32767)]
SORTS = (*(k for key in search.SORT_KEYS for k in (key, "-" + key)), search.RELEVANCE)
Sort = Literal[SORTS]  # type: ignore[valid-type]
Label = Literal[LABELS]  # type: ignore[valid-type]
HumanLabel = Literal[HUMAN_LABELS]  # type: ignore[valid-type]
Projection = Literal[PROJECTIONS]  # type: ignore[valid-type]
PROJECTION_HELP = ("Value projection for token, the top tokens shown and token ranking: 'raw' = v_i . E^T with E as "
                   "stored (seed 001's convention); 'folded' = the final norm's gain g folded in, v_i . (E * g)^T, "
                   "what the model's head does with the direction (equal to raw where the model has no gain).")
Finite = Annotated[float, Field(allow_inf_nan=False)]

_search_fields: dict[str, Any] = {
    "layer": (list[Annotated[int, Field(ge=0, le=32767)]], Field(
        default_factory=list, description="0-based layer; repeat for several.")),
    "layer_min": (int | None, Field(None, ge=0, le=32767, description="Lowest layer (inclusive).")),
    "layer_max": (int | None, Field(None, ge=0, le=32767, description="Highest layer (inclusive).")),
}
for _stat in NEURON_STATS:
    _search_fields[f"min_{_stat}"] = (Finite | None, Field(None, description=f"{_stat} >= this. {STAT_MEANINGS[_stat]}"))
    _search_fields[f"max_{_stat}"] = (Finite | None, Field(None, description=f"{_stat} <= this."))
_search_fields.update({
    "label": (Label | None, Field(None, description="The suggested label.")),
    "q": (str | None, Field(None, max_length=search.MAX_Q, description=(
        "Text pattern over the trigger prefixes and annotation descriptions, web-search syntax (Postgres "
        "websearch_to_tsquery, 'simple' configuration: no stemming): words, \"quoted phrases\", OR, -exclusion. A "
        "neuron matches when one of its positive trigger prefixes or one of its annotations' descriptions matches."))),
    "token": (str | None, Field(None, max_length=200, description=(
        "The value promotes this token: it is among the neuron's top token_rank tokens of v_i.E^T. id:N, "
        "text:EXACT, ' word' (space-marked form only) or word (with and without the space marker)."))),
    "token_rank": (int, Field(30, ge=1, le=1000, description="How deep in the value's top tokens token may be.")),
    "projection": (Projection, Field("raw", description=PROJECTION_HELP)),
    "trigger_token": (str | None, Field(None, max_length=200, description="A trigger prefix ends with this token.")),
    "next_token": (str | None, Field(None, max_length=200, description="A trigger prefix is followed by this token.")),
    "human_label": (HumanLabel | None, Field(None, description="Some annotator's current label is this.")),
    "annotated": (bool | None, Field(None, description="true: annotated by someone; false: by nobody.")),
    "annotator": (str | None, Field(None, max_length=100, description="Annotated by this annotator.")),
    "sort": (Sort | None, Field(None, description=(
        "A figure to sort by, '-' first for descending; ties by (layer, neuron) in the same direction; neurons "
        "without the figure come last. Default: layer, neuron. 'relevance' (with q only): by the coefficient of "
        "the neuron's best trigger matching q, descending."))),
    "limit": (int, Field(50, ge=1, le=search.MAX_LIMIT, description="Page size.")),
    "cursor": (str | None, Field(None, max_length=2000, description="next_cursor of the previous page.")),
})
SearchParams: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "SearchParams", __config__=ConfigDict(extra="forbid"), **_search_fields
)


def check_layer_range(layer_min: int | None, layer_max: int | None) -> None:
    """An empty range is a mistake, not a question with no answer: 422 rather than an empty page."""
    if layer_min is not None and layer_max is not None and layer_min > layer_max:
        raise InvalidParameter(f"layer_min: {layer_min} is above layer_max {layer_max}")


def search_query(p: dict[str, Any], *, viewer_id: int | None = None) -> search.SearchQuery:
    """A SearchQuery from validated SearchParams fields (shared with the review queue and the UI)."""
    check_layer_range(p.get("layer_min"), p.get("layer_max"))
    ranges = tuple((s, b, p[f"{b}_{s}"]) for s in NEURON_STATS for b in ("min", "max") if p.get(f"{b}_{s}") is not None)
    return search.SearchQuery(
        layers=tuple(p.get("layer") or ()), layer_min=p.get("layer_min"), layer_max=p.get("layer_max"), ranges=ranges,
        label=p.get("label"), q=p.get("q"), token=p.get("token"), token_rank=p.get("token_rank", 30),
        projection=p.get("projection", "raw"),
        trigger_token=p.get("trigger_token"), next_token=p.get("next_token"), human_label=p.get("human_label"),
        annotated=p.get("annotated"), annotator=p.get("annotator"), viewer_id=viewer_id, sort=p.get("sort"),
        limit=p.get("limit", 50),
        cursor=p.get("cursor"),
    )


def _run_info(run: Any) -> RunInfo:
    return RunInfo.model_validate(run, from_attributes=True) if run is not None else None  # type: ignore[return-value]


@router.get("/models", response_model=Page[ModelInfo], tags=["catalog"])
def list_models(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> Page[ModelInfo]:
    """Catalog entries with their current run (parameters, corpus, projection convention)."""
    after = None
    if cursor:
        try:
            after = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        except ValueError as exc:
            raise InvalidParameter("cursor: not a cursor of this list") from exc
        if not after:
            raise InvalidParameter("cursor: not a cursor of this list")
    rows = catalog.list_models(session, after=after, limit=limit + 1)
    items = [
        ModelInfo(name=e.name, source=e.source, family=e.family, model_type=e.model_type, n_layers=e.n_layers,
                  d_model=e.d_model, d_mlp=e.d_mlp, vocab_size=e.vocab_size, gated=e.gated, causal=e.causal,
                  current_run=_run_info(r) if r is not None else None)
        for e, r in rows[:limit]
    ]
    nxt = base64.urlsafe_b64encode(items[-1].name.encode()).decode().rstrip("=") if len(rows) > limit else None
    return Page[ModelInfo](items=items, next_cursor=nxt)


@router.get("/models/{model}/layers", response_model=Page[LayerInfo], tags=["catalog"])
def layers(model: ModelName, session: SessionDep) -> Page[LayerInfo]:
    """Per-layer figures (seed 000 weight statistics, seed 001 corpus figures) with histograms; one page."""
    rows = catalog.layer_summaries(session, model, histograms=True)
    return Page[LayerInfo](items=[LayerInfo.model_validate(r) for r in rows])


@router.get("/models/{model}/neurons/{layer}/{neuron}", response_model=NeuronRecord,
            response_model_exclude_none=False, tags=["neurons"])
def neuron(model: ModelName, layer: LayerIndex, neuron: NeuronIndex, session: SessionDep,
           vectors: Annotated[bool, Query(description="Add the key, value (and up) vectors.")] = False) -> NeuronRecord:
    """Everything stored about one neuron: the fields of an export record."""
    if not vectors:  # built by Postgres as JSON in one statement (0.3 ms of Python instead of ~4)
        return Response(catalog.neuron_record_json(session, model, layer, neuron),  # type: ignore[return-value]
                        media_type="application/json")
    return NeuronRecord.model_validate(catalog.neuron_record(session, model, layer, neuron, vectors=vectors))


@router.get("/models/{model}/neurons", response_model=SearchPage, tags=["neurons"], responses={401: {
    "model": ErrorBody, "description": "human_label or annotator without an annotator token, or a wrong token "
    "(annotators' labels stay hidden until one labels the neuron oneself)."}})
def search_neurons(model: ModelName, params: Annotated[SearchParams, Query()], session: SessionDep,  # type: ignore[valid-type]
                   me: ViewerDep) -> SearchPage:
    """Search neurons by layer, statistic ranges, label, text pattern and tokens; sorted; keyset pages.
    Annotation filters (human_label, annotator, descriptions in q) count only neurons the caller (by token)
    has annotated too: blind first labelling."""
    query = search_query(params.model_dump(), viewer_id=me.id if me is not None else None)  # type: ignore[attr-defined]
    # the page as JSON built by Postgres: no pydantic round trip for 50-500 items
    return Response(search.search_json(session, model, query), media_type="application/json")  # type: ignore[return-value]


@router.get("/models/{model}/tokens/{token}/neurons", response_model=TokenRanking, tags=["neurons"])
def token_ranking(
    model: ModelName,
    token: Annotated[str, Path(max_length=200, description="id:N, text:EXACT, ' word' or word (both forms).")],
    session: SessionDep,
    k: Annotated[int, Query(ge=1, le=vectors.MAX_K)] = 50,
    layer_min: LayerBound = None,
    layer_max: LayerBound = None,
    projection: Annotated[Projection, Query(description=PROJECTION_HELP)] = "raw",
    order: Annotated[TokenOrder, Query(description="How to rank the neurons (the answer's order says which was "
                                       "used): " + " ".join(f"{o}: {m}" for o, m in TOKEN_ORDERS.items()))] = "logit",
) -> TokenRanking:
    """The neurons that promote this token most, over every value vector of the layers asked for (not only
    each neuron's stored top tokens): by its logit v_i.e_token (default), its rank among the neuron's own
    logits, the cosine, or the logit times a typical coefficient; every item carries all four figures."""
    check_layer_range(layer_min, layer_max)
    return vectors.token_ranking(session, model, token, k=k, layer_min=layer_min, layer_max=layer_max,
                                 projection=projection, order=order)


@router.get("/models/{model}/neurons/{layer}/{neuron}/similar", response_model=SimilarPage, tags=["neurons"])
def similar(
    model: ModelName, layer: LayerIndex, neuron: NeuronIndex, session: SessionDep,
    space: Annotated[Literal["key", "value"], Query(description="Compare keys or values.")] = "value",
    k: Annotated[int, Query(ge=1, le=vectors.MAX_K)] = 20,
    layer_min: LayerBound = None,
    layer_max: LayerBound = None,
) -> SimilarPage:
    """Nearest neighbours of one neuron by cosine of their key or value vectors (the neuron itself left out)."""
    check_layer_range(layer_min, layer_max)
    return vectors.similar(session, model, layer, neuron, space=space, k=k, layer_min=layer_min, layer_max=layer_max)
