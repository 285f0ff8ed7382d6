"""Pydantic schemas: the contract of the HTTP API (and of export records, which use the same fields).

Layer and neuron indices are 0-based everywhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

# One line per figure: what it means. Shown in the OpenAPI schema (and, later, the review UI).
STAT_MEANINGS: dict[str, str] = {
    "key_norm": "L2 norm of the key k_i (the input-side row whose dot product with x gives the pre-activation; "
                "for gated MLPs the gate row g_i).",
    "value_norm": "L2 norm of the value v_i (the output-side row the coefficient scales).",
    "up_norm": "Gated models: L2 norm of the up-projection row u_i; null otherwise.",
    "bias": "Bias of the input projection for this neuron; null where the model has none (LLaMA family).",
    "alignment": "cos(k_i, v_i). GELU/ReLU models: seed 000's key-value (M1-M2) alignment. Gated models: "
                 "cos(gate row, v_i), which is not seed 000's figure (see up_alignment).",
    "up_alignment": "Gated models: cos(u_i, v_i); null otherwise.",
    "activation_mean": "Mean memory coefficient over every counted corpus position.",
    "activation_std": "Standard deviation of the memory coefficient over the corpus.",
    "activation_positive_fraction": "Fraction of corpus positions where the coefficient is > 0. GELU/ReLU: a "
                                    "firing rate. Gated (SwiGLU): the sign of silu(g.x) * (u.x), about 0.5 "
                                    "everywhere, not a firing rate (use gate_open_fraction).",
    "activation_max": "Highest memory coefficient seen in the corpus (the top trigger's).",
    "agreement": "Precision@N: fraction of the triggers with a next token whose next token is the value's "
                 "top token under the raw projection (see agreement_triggers for N; compare "
                 "agreement_shuffled and top_token_frequency, the chance levels).",
    "next_token_mean_rank": "Mean 1-based rank of the triggers' next tokens in v_i . E^T (vocabulary/2 = chance).",
    "ablation_last": "Mean over the triggers of the relative change (a'-a)/max(|a|, s) of the trigger coefficient "
                     "when the prefix's last token is removed, s the neuron's median trigger coefficient (a floor "
                     "for near-zero coefficients; (a'-a)/|a| wherever |a| >= s). Seed 001's figure; mostly "
                     "selection, see label_contrast.",
    "ablation_first": "Mean relative change (a'-a)/max(|a|, s) when the window's first token is removed.",
    "ablation_random": "Mean relative change (a'-a)/max(|a|, s) when one random token other than the last is "
                       "removed.",
    "gate_open_fraction": "Fraction of corpus positions where the key pre-activation is > 0: gate.x > 0 for "
                          "gated MLPs (their firing rate), x.k + b > 0 for GELU/ReLU (equal to "
                          "activation_positive_fraction there).",
    "abs_coefficient_p50": "Median |memory coefficient| over the corpus (from a histogram of 16 bins per octave, within 6.25%).",
    "abs_coefficient_p90": "90th percentile of |memory coefficient| over the corpus (within 6.25%).",
    "abs_coefficient_p99": "99th percentile of |memory coefficient| over the corpus (within 6.25%).",
    "negative_trigger_share": "Gated models: of the neuron's N strongest triggers by |coefficient| (the top-N "
                              "positive and top-N negative pooled), the share that are negative; null for "
                              "GELU/ReLU, whose coefficient is >= -0.17.",
    "agreement_shuffled": "Baseline: the agreement of this neuron's triggers scored against another neuron's "
                          "value (same layer, fixed-seed derangement): what any value scores.",
    "agreement_folded": "Agreement with the final norm's gain folded into the unembedding (projection=folded).",
    "agreement_top1": "1 if the strongest trigger's next token is the value's top token, else 0 (Geva et al.'s "
                      "per-layer top-1 agreement rate is its mean).",
    "agreement_negative": "Gated models: fraction of the negative triggers whose next token is the value's bottom "
                          "token (a negative coefficient adds -v_i).",
    "next_token_rank_percentile": "Median over the triggers of (rank-1)/(vocab-1) of the next token in v_i . E^T: "
                                  "0 = top, 0.5 = chance.",
    "next_token_rank_percentile_shuffled": "The same for another neuron's value (the shuffled baseline).",
    "top_token_frequency": "Corpus frequency of the value's top token: the agreement expected by chance.",
    "label_contrast": "Suggested-label input: median over triggers (prefix >= min_prefix tokens) of "
                      "(a_without_random - a_without_last) / s, s the neuron's median trigger coefficient: how "
                      "much more the last token matters than a random other one.",
    "label_context": "Suggested-label input: median of (a - a_without_random) / s: how much one random earlier "
                     "token matters.",
    "label_confidence": "Share of 200 bootstrap resamples of the neuron's triggers giving the same label.",
    "label_triggers": "Triggers the label is computed from (prefix of at least min_prefix tokens).",
}


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


class LayerInfo(BaseModel):
    layer: int
    mean_bias: float | None = None
    mean_alignment: float | None = None
    corr_bias_key_norm: float | None = None
    corr_bias_value_norm: float | None = None
    corr_bias_alignment: float | None = None
    bias_alignment_slope: float | None = None
    bias_alignment_intercept: float | None = None
    key_cosine_mean: float | None = None
    value_cosine_mean: float | None = None
    mean_agreement: float | None = None
    mean_ablation_last: float | None = Field(None, description="MEDIAN (despite the name, kept from seed 001) "
                                             "over every trigger of the layer of (a'-a)/max(|a|, s) without the "
                                             "last token; see ablation_last.")
    mean_ablation_first: float | None = Field(None, description="Median over every trigger of the layer of the "
                                              "relative change without the window's first token.")
    mean_ablation_random: float | None = Field(None, description="Median over every trigger of the layer of the "
                                               "relative change without one random other token.")
    mean_agreement_shuffled: float | None = Field(None, description="Mean agreement_shuffled: the chance level.")
    mean_agreement_folded: float | None = None
    agreement_top1_rate: float | None = Field(None, description="Geva et al.'s top-1 trigger agreement rate.")
    mean_agreement_negative: float | None = None
    mean_top_token_frequency: float | None = None
    median_rank_percentile: float | None = Field(None, description="Median over every trigger of the layer.")
    median_rank_percentile_shuffled: float | None = None
    median_label_contrast: float | None = None
    median_label_context: float | None = None
    label_counts: dict[str, int] = Field(default_factory=dict, description="Suggested labels in this layer.")
    histograms: dict[str, Any] = Field(default_factory=dict, description="Per statistic {edges, counts, below, "
                                       "above, min, max, clipped, quantiles, n}: 40 bins over [min, max], or, when "
                                       "clipped (the full span is over 3x the 1st-99th percentile span), over the "
                                       "1st-99th percentiles with the values beyond counted in below/above.")


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


class NeuronStats(BaseModel):
    key_norm: float | None = Field(None, description=STAT_MEANINGS["key_norm"])
    value_norm: float | None = Field(None, description=STAT_MEANINGS["value_norm"])
    up_norm: float | None = Field(None, description=STAT_MEANINGS["up_norm"])
    bias: float | None = Field(None, description=STAT_MEANINGS["bias"])
    alignment: float | None = Field(None, description=STAT_MEANINGS["alignment"])
    up_alignment: float | None = Field(None, description=STAT_MEANINGS["up_alignment"])
    activation_mean: float | None = Field(None, description=STAT_MEANINGS["activation_mean"])
    activation_std: float | None = Field(None, description=STAT_MEANINGS["activation_std"])
    activation_positive_fraction: float | None = Field(None, description=STAT_MEANINGS["activation_positive_fraction"])
    activation_max: float | None = Field(None, description=STAT_MEANINGS["activation_max"])
    agreement: float | None = Field(None, description=STAT_MEANINGS["agreement"])
    next_token_mean_rank: float | None = Field(None, description=STAT_MEANINGS["next_token_mean_rank"])
    ablation_last: float | None = Field(None, description=STAT_MEANINGS["ablation_last"])
    ablation_first: float | None = Field(None, description=STAT_MEANINGS["ablation_first"])
    ablation_random: float | None = Field(None, description=STAT_MEANINGS["ablation_random"])
    gate_open_fraction: float | None = Field(None, description=STAT_MEANINGS["gate_open_fraction"])
    abs_coefficient_p50: float | None = Field(None, description=STAT_MEANINGS["abs_coefficient_p50"])
    abs_coefficient_p90: float | None = Field(None, description=STAT_MEANINGS["abs_coefficient_p90"])
    abs_coefficient_p99: float | None = Field(None, description=STAT_MEANINGS["abs_coefficient_p99"])
    negative_trigger_share: float | None = Field(None, description=STAT_MEANINGS["negative_trigger_share"])
    agreement_shuffled: float | None = Field(None, description=STAT_MEANINGS["agreement_shuffled"])
    agreement_folded: float | None = Field(None, description=STAT_MEANINGS["agreement_folded"])
    agreement_top1: float | None = Field(None, description=STAT_MEANINGS["agreement_top1"])
    agreement_negative: float | None = Field(None, description=STAT_MEANINGS["agreement_negative"])
    next_token_rank_percentile: float | None = Field(None, description=STAT_MEANINGS["next_token_rank_percentile"])
    next_token_rank_percentile_shuffled: float | None = Field(
        None, description=STAT_MEANINGS["next_token_rank_percentile_shuffled"])
    top_token_frequency: float | None = Field(None, description=STAT_MEANINGS["top_token_frequency"])
    label_contrast: float | None = Field(None, description=STAT_MEANINGS["label_contrast"])
    label_context: float | None = Field(None, description=STAT_MEANINGS["label_context"])
    label_confidence: float | None = Field(None, description=STAT_MEANINGS["label_confidence"])
    label_triggers: int | None = Field(None, description=STAT_MEANINGS["label_triggers"])
    suggested_label: str | None = Field(None, description="shallow | semantic | shallow+semantic from "
                                        "label_contrast and label_context against thresholds pooled over the "
                                        "model (README, 'Suggested labels'; the run's label_rule); null without "
                                        "a corpus, for encoders, or with too few long-enough triggers.")


class NeuronRecord(NeuronStats):
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


class NeuronSummary(NeuronStats):
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
    method: Literal["exact", "hnsw"] = Field(description="exact: every value vector in range was scored; "
                                              "hnsw: candidates from the HNSW index, re-scored exactly.")
    complete: bool = Field(description="true when the items are provably the first k of the order over the "
                           "layers asked for. false: hnsw (approximate recall), or order=rank beyond the stored "
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
    method: Literal["exact", "hnsw"]


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
