"""Pydantic schemas: the contract of the HTTP API (and of export records, which use the same fields).

Layer and neuron indices are 0-based everywhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from catalog import vocab

T = TypeVar("T")

# One line per numeric figure: what it means (catalog.vocab). Shown in the OpenAPI schema and the review UI.
STAT_MEANINGS: dict[str, str] = vocab.STAT_MEANINGS


class ErrorBody(BaseModel):
    """Every error: one line saying what was wrong and, where it helps, what to do."""

    detail: str


class Page(BaseModel, Generic[T]):
    """A page of a list; ``next_cursor`` (opaque) fetches the next one, null on the last page."""

    items: list[T]
    next_cursor: str | None = None


class RunInfo(BaseModel):
    id: int
    status: str
    parameters: dict[str, Any]
    weights_sha256: str | None
    tokenizer_sha256: str | None
    projection_convention: str = Field(description="How value vectors were projected to tokens: "
                                       "'raw_unembedding' = v . E^T with E as stored.")
    corpus_sha256: str | None
    corpus: dict[str, Any] | None
    label_rule: dict[str, Any] | None = Field(None, description="The suggested-label rule as applied: minimum "
                                              "prefix, bootstrap, pooled thresholds.")
    timings: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None


class ModelInfo(BaseModel):
    name: str
    source: str
    family: str
    model_type: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    gated: bool
    causal: bool = Field(True, description="False for encoders (BERT family): a trigger is a token position in "
                         "context, read with the whole window on both sides.")
    current_run: RunInfo | None


# The layers row as the API gives it: every figure of catalog.vocab.LAYER_FIGURES (optional, with its
# meaning), the label counts and the histograms.
LayerInfo = create_model(
    "LayerInfo",
    layer=(int, ...),
    **{f.name: (f.type | None, Field(None, description=f.meaning)) for f in vocab.LAYER_FIGURES},  # type: ignore[call-overload]
    label_counts=(dict[str, int], Field(default_factory=dict, description="Suggested labels in this layer.")),
    histograms=(dict[str, Any], Field(default_factory=dict, description="Per statistic {edges, counts, below, "
                "above, min, max, clipped, quantiles, n}: 40 bins over [min, max], or, when clipped (the full "
                "span is over 3x the 1st-99th percentile span), over the 1st-99th percentiles with the values "
                "beyond counted in below/above.")),
)


class TokenLogit(BaseModel):
    token_id: int
    token: str | None
    logit: float


class Trigger(BaseModel):
    document: int = Field(description="0-based index of the document in corpus order.")
    position: int = Field(description="0-based index of the trigger token among the document's tokens.")
    text: str = Field(description="The prefix the model saw: the window's tokens up to and including the "
                      "trigger (untrusted corpus text).")
    activation: float = Field(description="The memory coefficient at the trigger.")
    next_token_id: int | None
    next_token: str | None
    without_last: float | None = None
    without_first: float | None = None
    without_random: float | None = None
    text_after: str | None = Field(None, description="Encoders only: the window's text after the trigger token "
                                   "(an encoder reads both sides; untrusted corpus text).")


# Every per-neuron figure of catalog.vocab.NEURON_FIGURES, in its order, optional, with its meaning.
NeuronStats = create_model(
    "NeuronStats",
    **{f.name: (f.type | None, Field(None, description=f.meaning)) for f in vocab.NEURON_FIGURES},  # type: ignore[call-overload]
)


class NeuronRecord(NeuronStats):  # type: ignore[misc,valid-type]
    """Everything stored about one neuron: the fields of an export record."""

    model: str
    run_id: int
    layer: int
    neuron: int
    agreement_triggers: int = Field(description="How many positive triggers have a next token: the N that "
                                    "agreement and next_token_mean_rank are computed over.")
    value_top_tokens: list[TokenLogit] = Field(description="Highest logits of v_i . E^T (projection 'raw').")
    value_bottom_tokens: list[TokenLogit]
    value_top_tokens_folded: list[TokenLogit] = Field(
        default_factory=list, description="Highest logits with the final norm's gain folded into E ('folded').")
    value_bottom_tokens_folded: list[TokenLogit] = Field(default_factory=list)
    triggers: list[Trigger]
    negative_triggers: list[Trigger] | None = Field(None, description="Gated models: the most negative coefficients.")
    key_vector: list[float] | None = None
    value_vector: list[float] | None = None
    up_vector: list[float] | None = None


class TopTrigger(BaseModel):
    text: str
    activation: float
    next_token: str | None


class MatchingTrigger(BaseModel):
    """A positive trigger whose prefix matches the search's ``q``, with the matched words marked."""

    text: str = Field(description="The trigger prefix (untrusted corpus text).")
    activation: float = Field(description="The memory coefficient at the trigger.")
    next_token: str | None
    spans: list[list[int]] = Field(description="[start, end) character offsets in text of the words q looks "
                                   "for (every occurrence, as the 'simple' configuration splits words), in order.")


class NeuronSummary(NeuronStats):  # type: ignore[misc,valid-type]
    """A search hit: the figures, the value's five top tokens and the strongest trigger."""

    layer: int
    neuron: int
    top_tokens: list[TokenLogit]
    top_trigger: TopTrigger | None
    matching_triggers: list[MatchingTrigger] | None = Field(
        None, description="With q only: up to 3 of the neuron's positive triggers whose prefix matches q, "
        "strongest first (empty when only an annotation description matched); null without q.")


class ResolvedToken(BaseModel):
    """How a token argument was read: the vocabulary entries it names."""

    given: str
    token_ids: list[int]
    tokens: list[str]


class SearchPage(Page[NeuronSummary]):
    resolved_tokens: dict[str, ResolvedToken] = Field(
        default_factory=dict, description="For token, trigger_token and next_token: the token ids they matched.")
    total: int | None = Field(None, description="How many neurons pass the filters (all pages): exact when "
                              "total_exact, else the planner's estimate (above CATALOG_SEARCH_TOTAL_MAX).")
    total_exact: bool | None = Field(None, description="Whether total is an exact count.")


# The orders of token ranking (GET /models/{m}/tokens/{token}/neurons?order=...): one line each.
TOKEN_ORDERS: dict[str, str] = {
    "logit": "v_i . e_token, highest first: what the token receives per unit coefficient (large-norm values win).",
    "rank": "the token's 1-based rank among the neuron's own logits over the whole vocabulary, lowest first "
            "(1 = its top token; norm-free); ties by cosine.",
    "cosine": "cos(v_i, e_token), highest first: the value's direction only, norm-free.",
    "effect": "abs_coefficient_p99 x logit, highest first: the logit scaled by a strong, typical coefficient "
              "(the neuron's 99th-percentile |coefficient| over the corpus); neurons without corpus figures "
              "are left out, and a catalog without any answers 409.",
}
TokenOrder = Literal["logit", "rank", "cosine", "effect"]


class RankedNeuron(BaseModel):
    """One neuron of a token ranking with every figure behind the orders (e_token below is the
    unembedding row of ``token_id``, times the final norm's gain with projection=folded)."""

    layer: int
    neuron: int
    token_id: int = Field(description="Which of the resolved tokens these figures are for (a word naming two "
                          "tokens ranks each neuron by its better one under the order).")
    logit: float = Field(description="v_i . e_token: what the token receives per unit coefficient.")
    rank: int | None = Field(description="1-based rank of the token among the neuron's logits over the whole "
                             "vocabulary (1 + the tokens with a higher logit). Exact for every item with "
                             "order=rank; otherwise from the stored top tokens, null when beyond them (rank > "
                             "stored_top_tokens).")
    cosine: float = Field(description="cos(v_i, e_token).")
    value_norm: float
    coefficient: float | None = Field(description="The typical coefficient of effect: abs_coefficient_p99, the "
                                      "neuron's 99th-percentile |coefficient| over the corpus (within 6.25%); "
                                      "null without corpus figures.")
    activation_max: float | None = Field(description="The highest coefficient seen in the corpus (for "
                                         "comparison with coefficient).")
    effect: float | None = Field(description="coefficient x logit; null without corpus figures.")


class TokenRanking(Page[RankedNeuron]):
    resolved_tokens: dict[str, ResolvedToken] = Field(description="How the path's token was read, as search's "
                                                      "resolved_tokens: {'token': {given, token_ids, tokens}}.")
    order: TokenOrder = Field(description="The order of the items: " + " ".join(
        f"{k}: {v}" for k, v in TOKEN_ORDERS.items()))
    method: Literal["exact"] = Field(description="Always exact (since part 10): the token's stored exact list "
                                     "when it holds the answer, else every value vector in range scored.")
    complete: bool = Field(description="true when the items are provably the first k of the order over the "
                           "layers asked for. false: order=rank beyond the stored "
                           "top tokens, where only candidates (the nearest values by cosine) had their rank "
                           "computed; their ranks are exact either way.")
    stored_top_tokens: int = Field(description="How many top tokens per neuron the catalog stores: ranks up to "
                                   "this are read from them.")


class SimilarNeuron(BaseModel):
    layer: int
    neuron: int
    cosine: float


class SimilarPage(Page[SimilarNeuron]):
    space: Literal["key", "value"]
    method: Literal["exact"] = Field(description="Always exact (since part 10): the run's stored exact list when "
                                     "it holds the answer, else every vector in range scored.")


class ProbeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=20_000, description="Text to run the model on (at most one window of tokens).")
    k: int = Field(10, ge=1, le=100, description="Neurons per token and overall.")


class ProbeNeuron(BaseModel):
    layer: int
    neuron: int
    coefficient: float


class ProbeToken(BaseModel):
    position: int
    token_id: int
    token: str
    neurons: list[ProbeNeuron]


class ProbeResult(BaseModel):
    model: str
    run_id: int
    tokens: list[ProbeToken] = Field(description="Per token of the text (BOS not included): the neurons with "
                                     "the highest coefficients there.")
    top: list[ProbeNeuron] = Field(description="The neurons with the highest maximum coefficient over the text.")
