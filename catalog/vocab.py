"""The catalog's vocabulary: every per-neuron and per-layer figure, label and kind, named once.

One entry per figure (name, Python type, nullability in the database, meaning, group); the rest of
the code derives its lists from here: the figure columns of the ``neurons`` and ``layers`` tables
(``catalog.store.models``), the writer's column types (``catalog.store.ingest``), the read schemas
and their descriptions (``catalog.read.schemas``), search filters and sorts (``NEURON_STATS``), the
export fields and Parquet schema, and the report's label orders. Free-string kinds (labels,
ablations, projections, value-token kinds, trigger signs) are enums here.

Plain Python only (no torch, no SQLAlchemy): the torch-free read side and shard states import it.
Layer and neuron indices are 0-based everywhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# --- kinds ----------------------------------------------------------------------------------------


class SuggestedLabel(enum.StrEnum):
    """The automatic label of a neuron (README, "Suggested labels"), from label_contrast and label_context."""

    shallow = "shallow"
    semantic = "semantic"
    shallow_semantic = "shallow+semantic"


class HumanLabel(enum.StrEnum):
    """An annotator's label (part 4): the suggested labels plus "none" (no clear pattern)."""

    shallow = "shallow"
    semantic = "semantic"
    shallow_semantic = "shallow+semantic"
    none = "none"


# Suggested labels on the scale from shallow to semantic: the order of stacked shares and tables.
LABEL_SCALE = (SuggestedLabel.shallow, SuggestedLabel.shallow_semantic, SuggestedLabel.semantic)


class Ablation(enum.StrEnum):
    """A prefix ablation (seed 001): the trigger prefix without its last token, the window's first
    token, or one random token other than the last."""

    last = "last"
    first = "first"
    random = "random"


class Projection(enum.StrEnum):
    """Value-projection conventions (part 5): "raw" = v . E^T with E as stored; "folded" = the final
    norm's gain folded into E (v . (E * g)^T), what the model's head does to a direction."""

    raw = "raw"
    folded = "folded"


class ValueTokenKind(enum.StrEnum):
    """Which end of a value's logits v_i . E^T a stored value token is from."""

    top = "top"  # highest logits
    bottom = "bottom"  # lowest logits


class TriggerSign(enum.IntEnum):
    """Which extreme of the memory coefficient a trigger is."""

    positive = 1  # highest coefficients
    negative = -1  # most negative coefficients (gated models)


LABELS: tuple[str, ...] = tuple(m.value for m in SuggestedLabel)
HUMAN_LABELS: tuple[str, ...] = tuple(m.value for m in HumanLabel)
ABLATIONS: tuple[str, ...] = tuple(m.value for m in Ablation)
PROJECTIONS: tuple[str, ...] = tuple(m.value for m in Projection)
SUMMARY_TOKENS = 5  # promoted tokens a search hit shows (catalog/store/search_index.py stores them)


# --- figures --------------------------------------------------------------------------------------


class Group(enum.StrEnum):
    """Where a figure comes from. Every group but ``weights`` is null for a weight-only run."""

    weights = "weights"  # the MLP's weights (seed 000)
    activation = "activation"  # the memory coefficient over the corpus (seed 001)
    agreement = "agreement"  # triggers' next tokens against the value's top tokens (seed 001)
    ablation = "ablation"  # trigger prefixes with one token removed (seed 001)
    firing = "firing"  # architecture-aware firing figures (part 5)
    baseline = "baseline"  # chance levels and variants beside agreement (part 5)
    label = "label"  # the suggested label and its inputs (part 5)


@dataclass(frozen=True)
class Figure:
    """One figure: a column of ``neurons`` (per neuron) or ``layers`` (per layer).

    ``type`` is the Python type of a value (float, int, or str for a label); ``nullable`` is the
    database column's nullability (the read schemas make every figure optional).
    """

    name: str
    type: type
    group: Group
    meaning: str
    nullable: bool = True

    @property
    def numeric(self) -> bool:
        return self.type in (float, int)


def _f(name: str, group: Group, meaning: str, *, kind: type = float, nullable: bool = True) -> Figure:
    return Figure(name, kind, group, meaning, nullable)


W, ACT, AGR, ABL, FIRE, BASE, LAB = (Group.weights, Group.activation, Group.agreement, Group.ablation, Group.firing,
                                     Group.baseline, Group.label)

# Per neuron, in API and export order. The numeric ones are NEURON_STATS: search filters (min_/max_),
# sorts, per-statistic indexes and export fields are built from that list, in this order.
NEURON_FIGURES: tuple[Figure, ...] = (
    _f("key_norm", W, "L2 norm of the key k_i (the input-side row whose dot product with x gives the "
       "pre-activation; for gated MLPs the gate row g_i).", nullable=False),
    _f("value_norm", W, "L2 norm of the value v_i (the output-side row the coefficient scales).", nullable=False),
    _f("up_norm", W, "Gated models: L2 norm of the up-projection row u_i; null otherwise."),
    _f("bias", W, "Bias of the input projection for this neuron; null where the model has none (LLaMA family)."),
    _f("alignment", W, "cos(k_i, v_i). GELU/ReLU models: seed 000's key-value (M1-M2) alignment. Gated models: "
       "cos(gate row, v_i), which is not seed 000's figure (see up_alignment).", nullable=False),
    _f("up_alignment", W, "Gated models: cos(u_i, v_i); null otherwise."),
    _f("activation_mean", ACT, "Mean memory coefficient over every counted corpus position."),
    _f("activation_std", ACT, "Standard deviation of the memory coefficient over the corpus."),
    _f("activation_positive_fraction", ACT, "Fraction of corpus positions where the coefficient is > 0. "
       "GELU/ReLU: a firing rate. Gated (SwiGLU): the sign of silu(g.x) * (u.x), about 0.5 everywhere, not a "
       "firing rate (use gate_open_fraction)."),
    _f("activation_max", ACT, "Highest memory coefficient seen in the corpus (the top trigger's)."),
    _f("agreement", AGR, "Precision@N: fraction of the triggers with a next token whose next token is the "
       "value's top token under the raw projection (see agreement_triggers for N; compare agreement_shuffled "
       "and top_token_frequency, the chance levels)."),
    _f("next_token_mean_rank", AGR, "Mean 1-based rank of the triggers' next tokens in v_i . E^T "
       "(vocabulary/2 = chance)."),
    _f("ablation_last", ABL, "Mean over the triggers of the relative change (a'-a)/max(|a|, s) of the trigger "
       "coefficient when the prefix's last token is removed, s the neuron's median trigger coefficient (a floor "
       "for near-zero coefficients; (a'-a)/|a| wherever |a| >= s). Seed 001's figure; mostly selection, see "
       "label_contrast."),
    _f("ablation_first", ABL, "Mean relative change (a'-a)/max(|a|, s) when the window's first token is removed."),
    _f("ablation_random", ABL, "Mean relative change (a'-a)/max(|a|, s) when one random token other than the "
       "last is removed."),
    _f("gate_open_fraction", FIRE, "Fraction of corpus positions where the key pre-activation is > 0: gate.x > 0 "
       "for gated MLPs (their firing rate), x.k + b > 0 for GELU/ReLU (equal to activation_positive_fraction "
       "there)."),
    _f("abs_coefficient_p50", FIRE, "Median |memory coefficient| over the corpus (from a histogram of 16 bins "
       "per octave, within 6.25%)."),
    _f("abs_coefficient_p90", FIRE, "90th percentile of |memory coefficient| over the corpus (within 6.25%)."),
    _f("abs_coefficient_p99", FIRE, "99th percentile of |memory coefficient| over the corpus (within 6.25%)."),
    _f("negative_trigger_share", FIRE, "Gated models: of the neuron's N strongest triggers by |coefficient| (the "
       "top-N positive and top-N negative pooled), the share that are negative; null for GELU/ReLU, whose "
       "coefficient is >= -0.17."),
    _f("agreement_shuffled", BASE, "Baseline: the agreement of this neuron's triggers scored against another "
       "neuron's value (same layer, fixed-seed derangement): what any value scores."),
    _f("agreement_folded", BASE, "Agreement with the final norm's gain folded into the unembedding "
       "(projection=folded)."),
    _f("agreement_top1", BASE, "1 if the strongest trigger's next token is the value's top token, else 0 (Geva "
       "et al.'s per-layer top-1 agreement rate is its mean)."),
    _f("agreement_negative", BASE, "Gated models: fraction of the negative triggers whose next token is the "
       "value's bottom token (a negative coefficient adds -v_i)."),
    _f("next_token_rank_percentile", BASE, "Median over the triggers of (rank-1)/(vocab-1) of the next token in "
       "v_i . E^T: 0 = top, 0.5 = chance."),
    _f("next_token_rank_percentile_shuffled", BASE, "The same for another neuron's value (the shuffled "
       "baseline)."),
    _f("top_token_frequency", BASE, "Corpus frequency of the value's top token: the agreement expected by "
       "chance."),
    _f("label_contrast", LAB, "Suggested-label input: median over triggers (prefix >= min_prefix tokens) of "
       "(a_without_random - a_without_last) / s, s the neuron's median trigger coefficient: how much more the "
       "last token matters than a random other one."),
    _f("label_context", LAB, "Suggested-label input: median of (a - a_without_random) / s: how much one random "
       "earlier token matters."),
    _f("label_confidence", LAB, "Share of 200 bootstrap resamples of the neuron's triggers giving the same "
       "label."),
    _f("label_triggers", LAB, "Triggers the label is computed from (prefix of at least min_prefix tokens).",
       kind=int),
    _f("suggested_label", LAB, "shallow | semantic | shallow+semantic from label_contrast and label_context "
       "against thresholds pooled over the model (README, 'Suggested labels'; the run's label_rule); null "
       "without a corpus, for encoders, or with too few long-enough triggers.", kind=str),
)
NEURON_FIGURE: dict[str, Figure] = {f.name: f for f in NEURON_FIGURES}
# The numeric per-neuron figures, in API and export order.
NEURON_STATS: tuple[str, ...] = tuple(f.name for f in NEURON_FIGURES if f.numeric)
# Every per-neuron figure (NEURON_STATS, then suggested_label): the figure fields of a neuron record.
NEURON_FIELDS: tuple[str, ...] = tuple(f.name for f in NEURON_FIGURES)
# One line per numeric figure: what it means (OpenAPI, the review UI, search filters).
STAT_MEANINGS: dict[str, str] = {f.name: f.meaning for f in NEURON_FIGURES if f.numeric}

# Per layer (the ``layers`` row besides run_id, layer and histograms), in API order.
LAYER_FIGURES: tuple[Figure, ...] = (
    _f("mean_bias", W, "Mean of the layer's input-projection biases; null where the model has none."),
    _f("mean_alignment", W, "Mean over the layer's neurons of alignment cos(k_i, v_i).", nullable=False),
    _f("corr_bias_key_norm", W, "Pearson correlation over the layer's neurons of bias and key_norm (seed 000)."),
    _f("corr_bias_value_norm", W, "Pearson correlation of bias and value_norm (seed 000)."),
    _f("corr_bias_alignment", W, "Pearson correlation of bias and alignment (seed 000)."),
    _f("bias_alignment_slope", W, "Slope of the least-squares line bias = slope x alignment + intercept."),
    _f("bias_alignment_intercept", W, "Intercept of the least-squares line bias = slope x alignment + intercept."),
    _f("key_cosine_mean", W, "Mean cos(k_i, k_j) over every pair i != j of the layer's keys.", nullable=False),
    _f("value_cosine_mean", W, "Mean cos(v_i, v_j) over every pair i != j of the layer's values.",
       nullable=False),
    _f("mean_agreement", AGR, "Mean agreement over the layer's neurons."),
    _f("mean_ablation_last", ABL, "MEDIAN (despite the name, kept from seed 001) over every trigger of the "
       "layer of (a'-a)/max(|a|, s) without the last token; see ablation_last."),
    _f("mean_ablation_first", ABL, "Median over every trigger of the layer of the relative change without the "
       "window's first token."),
    _f("mean_ablation_random", ABL, "Median over every trigger of the layer of the relative change without one "
       "random other token."),
    _f("mean_agreement_shuffled", BASE, "Mean agreement_shuffled: the chance level."),
    _f("mean_agreement_folded", BASE, "Mean agreement_folded over the layer's neurons."),
    _f("agreement_top1_rate", BASE, "Geva et al.'s top-1 trigger agreement rate."),
    _f("mean_agreement_negative", BASE, "Mean agreement_negative over the layer's neurons (gated models)."),
    _f("mean_top_token_frequency", BASE, "Mean top_token_frequency over the layer's neurons."),
    _f("median_rank_percentile", BASE, "Median over every trigger of the layer."),
    _f("median_rank_percentile_shuffled", BASE, "The same with another neuron's value (the shuffled baseline)."),
    _f("median_label_contrast", LAB, "Median label_contrast over the layer's neurons."),
    _f("median_label_context", LAB, "Median label_context over the layer's neurons."),
)
LAYER_FIGURE: dict[str, Figure] = {f.name: f for f in LAYER_FIGURES}
LAYER_STATS: tuple[str, ...] = tuple(f.name for f in LAYER_FIGURES)
