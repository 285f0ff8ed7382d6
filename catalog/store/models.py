"""ORM tables. Alembic migrations are generated from this metadata; the app never calls create_all.

A catalog entry (``CatalogModel``) points at its current completed ``ExtractionRun``; all rows of
layers, neurons, value tokens and triggers belong to one run, so a new run becomes visible in one
commit that moves that pointer, and a failed run is never pointed at.
Layer and neuron indices are 0-based.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship
from sqlalchemy.types import TypeEngine

# re-exported for the many importers of NEURON_STATS, LABELS, HUMAN_LABELS and PROJECTIONS
from catalog.vocab import HUMAN_LABELS, LABELS, LAYER_FIGURE, NEURON_FIGURE, NEURON_STATS, PROJECTIONS, Figure  # noqa: F401

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The figures, labels and kinds are named once, in catalog.vocab: NEURON_STATS (the numeric
# per-neuron figures in API and export order, the one list that search filters, sorts, per-statistic
# indexes and export fields are built from), PROJECTIONS, LABELS (suggested) and HUMAN_LABELS.
# Postgres text-search configuration of pattern search: no stemming, no stop words, so a pattern
# matches the words of the prefix as written ("ends with 'substitutes'" is a shallow pattern).
TEXT_SEARCH_CONFIG = "simple"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sql_type(f: Figure) -> TypeEngine[Any]:
    """A figure's SQL type from its vocabulary type (labels are short text)."""
    sql: dict[type, TypeEngine[Any]] = {float: Float(), int: Integer(), str: String(20)}
    return sql[f.type]


def _per_neuron(name: str) -> MappedColumn[Any]:
    """A figure column of ``neurons`` as catalog.vocab describes it (SQL type and nullability);
    tests/test_vocab.py checks that the table holds exactly the vocabulary's figures."""
    f = NEURON_FIGURE[name]
    return mapped_column(_sql_type(f), nullable=f.nullable)


def _per_layer(name: str) -> MappedColumn[Any]:
    """A figure column of ``layers`` as catalog.vocab describes it."""
    f = LAYER_FIGURE[name]
    return mapped_column(_sql_type(f), nullable=f.nullable)


class RunStatus(enum.StrEnum):
    running = "running"
    complete = "complete"
    failed = "failed"
    superseded = "superseded"
    # part 8: the run's process ended before it finished (killed, lost): ``runs resume`` goes on from
    # its finished shards; ``runs cancel`` ends it for good
    interrupted = "interrupted"
    cancelled = "cancelled"


class ShardKind(enum.StrEnum):
    """A run's pieces: ``pass`` shards cover corpus document ranges; ``ablation`` shards the trigger
    prefixes of document ranges, planned once the pass shards are merged."""

    pass_ = "pass"
    ablation = "ablation"


class ShardStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


class RunStep(enum.StrEnum):
    """Where a run is: its pass shards, its ablation shards, then one finishing step (labels,
    baselines, projections, ingest, indexes and publish, in one transaction)."""

    pass_ = "pass"
    merge = "merge"  # queue-driven runs: one task merges the pass states and plans the ablation shards
    ablation = "ablation"
    finish = "finish"
    done = "done"


class CatalogModel(Base):
    __tablename__ = "catalog_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(Text)
    family: Mapped[str] = mapped_column(String(40))
    model_type: Mapped[str] = mapped_column(String(40))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    gated: Mapped[bool] = mapped_column(Boolean)
    # False for encoders (BERT family): a trigger is a token position in context, seen from both sides
    causal: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    current_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("extraction_runs.id", use_alter=True, ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    current_run: Mapped[ExtractionRun | None] = relationship(foreign_keys=[current_run_id], lazy="raise")


class ExtractionRun(Base):
    __tablename__ = "extraction_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("catalog_models.id", ondelete="CASCADE"), index=True)
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, name="run_status"), default=RunStatus.running)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    tokenizer_sha256: Mapped[str | None] = mapped_column(String(64))
    # How value vectors were projected to tokens; "raw_unembedding" = v . E^T with E as stored.
    projection_convention: Mapped[str] = mapped_column(String(40), default="raw_unembedding")
    # the final norm's gain g, folded into E for the "folded" projection; null without a gain
    final_norm_gain: Mapped[Any | None] = mapped_column(Vector())
    # the suggested-label rule as applied: thresholds (pooled over the whole model), minimum
    # prefix length, bootstrap size and seed (part 5)
    label_rule: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    corpus_sha256: Mapped[str | None] = mapped_column(String(64))
    corpus: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # source, format, provenance, counts
    timings: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # part 8: the request as given (what ``runs resume`` reloads), the plan's figures (shard budget,
    # tokens, documents, the --max-tokens cut), the step reached, and who drives it: "local" (a
    # process holding the run's liveness lock) or "queue" (Celery workers, part 9)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    step: Mapped[str | None] = mapped_column(String(16))
    driver: Mapped[str] = mapped_column(String(16), server_default=text("'local'"))
    # part 9, queue-driven runs: when the current step's message (merge, finish) was last sent, who
    # runs that step now and how many times it was started (catalog/runs/queued.py)
    step_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    step_holder: Mapped[str | None] = mapped_column(Text)
    step_attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class RunShard(Base):
    """One piece of a run: a range of corpus documents [doc_start, doc_stop) in corpus order.

    A holder takes it with a lease (holder, lease_expires_at) and a new attempt number; its state is
    written (``ShardState``) in the transaction that marks it done, and only by the attempt that still
    holds it, so a stale holder's late write is refused (catalog/runs/lifecycle.py).
    """

    __tablename__ = "run_shards"
    __table_args__ = (
        CheckConstraint("kind IN ('pass', 'ablation')", name="kind"),
        CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name="status"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    doc_start: Mapped[int] = mapped_column(BigInteger)
    doc_stop: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)  # planned: corpus tokens (pass) or prefixes (ablation)
    # where doc_start's line begins in a text/JSONL corpus file: a shard seeks there (null: reads from the start)
    byte_offset: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(10), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    holder: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))  # progress of the attempt
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    state_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # its message last sent (queue runs)


class ShardState(Base):
    """A done shard's serialised state, one row per layer (layer -1: shard-wide figures); dropped
    once the run is published."""

    __tablename__ = "shard_states"
    __table_args__ = (
        ForeignKeyConstraint(["run_id", "kind", "index"], ["run_shards.run_id", "run_shards.kind", "run_shards.index"],
                             ondelete="CASCADE"),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class Token(Base):
    """The tokenizer's vocabulary as seen by a run (token text decoded, special tokens included)."""

    __tablename__ = "tokens"

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    # Row of the unembedding E as stored (the run's projection convention): token ranking scores
    # v_i . e_token over every value vector. Null for runs made before revision 0002.
    unembedding: Mapped[Any | None] = mapped_column(Vector())

    __table_args__ = (Index("ix_tokens_run_text", "run_id", "text"),)  # token given as text


class Layer(Base):
    __tablename__ = "layers"

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    # seed 000
    mean_bias: Mapped[float | None] = _per_layer("mean_bias")
    mean_alignment: Mapped[float] = _per_layer("mean_alignment")
    corr_bias_key_norm: Mapped[float | None] = _per_layer("corr_bias_key_norm")
    corr_bias_value_norm: Mapped[float | None] = _per_layer("corr_bias_value_norm")
    corr_bias_alignment: Mapped[float | None] = _per_layer("corr_bias_alignment")
    bias_alignment_slope: Mapped[float | None] = _per_layer("bias_alignment_slope")
    bias_alignment_intercept: Mapped[float | None] = _per_layer("bias_alignment_intercept")
    key_cosine_mean: Mapped[float] = _per_layer("key_cosine_mean")
    value_cosine_mean: Mapped[float] = _per_layer("value_cosine_mean")
    # seed 001 (corpus pass); null for weight-only runs
    mean_agreement: Mapped[float | None] = _per_layer("mean_agreement")
    mean_ablation_last: Mapped[float | None] = _per_layer("mean_ablation_last")
    mean_ablation_first: Mapped[float | None] = _per_layer("mean_ablation_first")
    mean_ablation_random: Mapped[float | None] = _per_layer("mean_ablation_random")
    # part 5: baselines and the label rule's inputs, per layer
    mean_agreement_shuffled: Mapped[float | None] = _per_layer("mean_agreement_shuffled")
    mean_agreement_folded: Mapped[float | None] = _per_layer("mean_agreement_folded")
    agreement_top1_rate: Mapped[float | None] = _per_layer("agreement_top1_rate")
    mean_agreement_negative: Mapped[float | None] = _per_layer("mean_agreement_negative")
    mean_top_token_frequency: Mapped[float | None] = _per_layer("mean_top_token_frequency")
    median_rank_percentile: Mapped[float | None] = _per_layer("median_rank_percentile")
    median_rank_percentile_shuffled: Mapped[float | None] = _per_layer("median_rank_percentile_shuffled")
    median_label_contrast: Mapped[float | None] = _per_layer("median_label_contrast")
    median_label_context: Mapped[float | None] = _per_layer("median_label_context")
    histograms: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)


class Neuron(Base):
    __tablename__ = "neurons"
    # One btree per statistic: range filters, and sorts with keyset pagination (stat, layer, neuron)
    # read in index order in either direction.
    __table_args__ = tuple(Index(f"ix_neurons_run_{s}", "run_id", s, "layer", "neuron") for s in NEURON_STATS)

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_norm: Mapped[float] = _per_neuron("key_norm")
    value_norm: Mapped[float] = _per_neuron("value_norm")
    up_norm: Mapped[float | None] = _per_neuron("up_norm")
    bias: Mapped[float | None] = _per_neuron("bias")
    alignment: Mapped[float] = _per_neuron("alignment")
    up_alignment: Mapped[float | None] = _per_neuron("up_alignment")
    # Vectors without a fixed dimension so one table holds every model; part 4 adds per-model
    # HNSW expression indexes (cast to vector(d_model)).
    key_vector: Mapped[Any] = mapped_column(Vector())
    value_vector: Mapped[Any] = mapped_column(Vector())
    up_vector: Mapped[Any | None] = mapped_column(Vector())
    # corpus pass (part 2); null for weight-only runs
    activation_mean: Mapped[float | None] = _per_neuron("activation_mean")
    activation_std: Mapped[float | None] = _per_neuron("activation_std")
    activation_positive_fraction: Mapped[float | None] = _per_neuron("activation_positive_fraction")
    activation_max: Mapped[float | None] = _per_neuron("activation_max")
    agreement: Mapped[float | None] = _per_neuron("agreement")
    next_token_mean_rank: Mapped[float | None] = _per_neuron("next_token_mean_rank")
    ablation_last: Mapped[float | None] = _per_neuron("ablation_last")
    ablation_first: Mapped[float | None] = _per_neuron("ablation_first")
    ablation_random: Mapped[float | None] = _per_neuron("ablation_random")
    suggested_label: Mapped[str | None] = _per_neuron("suggested_label")
    # part 5 (null for weight-only runs; see README "Figures and what they mean")
    gate_open_fraction: Mapped[float | None] = _per_neuron("gate_open_fraction")  # key pre-activation > 0
    abs_coefficient_p50: Mapped[float | None] = _per_neuron("abs_coefficient_p50")
    abs_coefficient_p90: Mapped[float | None] = _per_neuron("abs_coefficient_p90")
    abs_coefficient_p99: Mapped[float | None] = _per_neuron("abs_coefficient_p99")
    negative_trigger_share: Mapped[float | None] = _per_neuron("negative_trigger_share")  # gated models
    agreement_shuffled: Mapped[float | None] = _per_neuron("agreement_shuffled")
    agreement_folded: Mapped[float | None] = _per_neuron("agreement_folded")
    agreement_top1: Mapped[float | None] = _per_neuron("agreement_top1")
    agreement_negative: Mapped[float | None] = _per_neuron("agreement_negative")  # gated models
    next_token_rank_percentile: Mapped[float | None] = _per_neuron("next_token_rank_percentile")
    next_token_rank_percentile_shuffled: Mapped[float | None] = _per_neuron(
        "next_token_rank_percentile_shuffled")
    top_token_frequency: Mapped[float | None] = _per_neuron("top_token_frequency")
    label_contrast: Mapped[float | None] = _per_neuron("label_contrast")
    label_context: Mapped[float | None] = _per_neuron("label_context")
    label_confidence: Mapped[float | None] = _per_neuron("label_confidence")
    label_triggers: Mapped[int | None] = _per_neuron("label_triggers")


class ValueToken(Base):
    """Tokens with the highest (rank 0..29) and lowest (kind 'bottom') logits of v_i . E^T, per
    projection convention ('raw' or 'folded', see PROJECTIONS)."""

    __tablename__ = "value_tokens"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "layer", "neuron"], ["neurons.run_id", "neurons.layer", "neurons.neuron"],
            ondelete="CASCADE",
        ),
        # "which neurons promote token T" (part 4)
        Index("ix_value_tokens_run_token_rank", "run_id", "token_id", "rank",
              postgresql_where="kind = 'top' AND convention = 'raw'"),
        Index("ix_value_tokens_run_token_rank_folded", "run_id", "token_id", "rank",
              postgresql_where="kind = 'top' AND convention = 'folded'"),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    convention: Mapped[str] = mapped_column(String(6), primary_key=True, server_default="raw")
    kind: Mapped[str] = mapped_column(String(6), primary_key=True)  # 'top' | 'bottom'
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # 0 = most extreme
    token_id: Mapped[int] = mapped_column(Integer)
    logit: Mapped[float] = mapped_column(Float)


class Prefix(Base):
    """A corpus prefix that is some neuron's trigger: a document's tokens up to ``position`` (part 2).

    Stored once per run and shared by every neuron that it triggers; the text is what the model
    saw (the window's tokens up to and including the trigger token, BOS not included).
    """

    __tablename__ = "prefixes"
    # Pattern search: finds the prefixes of a rare word directly, and gives the planner statistics
    # to choose between that and walking neurons in order.
    __table_args__ = (Index("ix_prefixes_tsv", "tsv", postgresql_using="gin"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    document: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 0-based index in corpus order
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based among the document's tokens
    text: Mapped[str] = mapped_column(Text)
    token_id: Mapped[int] = mapped_column(Integer)  # the trigger token itself
    next_token_id: Mapped[int | None] = mapped_column(Integer)  # null at the end of the document
    # encoders only: the window's text after the trigger token (an encoder reads both sides)
    text_after: Mapped[str | None] = mapped_column(Text)
    # the text's lexemes, stored (revision 0011): a phrase or an exclusion re-checks each candidate
    # prefix, and reading these is far cheaper than parsing the text again
    tsv: Mapped[Any] = mapped_column(
        TSVECTOR, Computed(f"to_tsvector('{TEXT_SEARCH_CONFIG}'::regconfig, text)", persisted=True))


class Trigger(Base):
    """A document and the position of a neuron's extreme memory coefficient in it (part 2)."""

    __tablename__ = "triggers"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "layer", "neuron"], ["neurons.run_id", "neurons.layer", "neurons.neuron"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["run_id", "document", "position"], ["prefixes.run_id", "prefixes.document", "prefixes.position"],
            ondelete="CASCADE",
        ),
        # "which neurons fire on this prefix" (pattern search joins prefixes -> triggers): the columns that
        # join reads are included, so it is an index-only scan, not a random heap read per trigger (0006)
        Index("ix_triggers_run_document_position", "run_id", "document", "position",
              postgresql_include=["layer", "neuron", "sign", "coefficient"]),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    # +1: highest coefficients; -1: most negative (gated models)
    sign: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # 0 = strongest
    document: Mapped[int] = mapped_column(BigInteger)
    position: Mapped[int] = mapped_column(Integer)
    coefficient: Mapped[float] = mapped_column(Float)
    # prefix ablations (sign +1 only): coefficient with the last / first / one random token removed;
    # null where the prefix has a single token
    coefficient_without_last: Mapped[float | None] = mapped_column(Float)
    coefficient_without_first: Mapped[float | None] = mapped_column(Float)
    coefficient_without_random: Mapped[float | None] = mapped_column(Float)


class NeuronSearch(Base):
    """Per-neuron search terms over its positive trigger prefixes, derived from triggers + prefixes at ingest.

    ``terms`` holds the lexemes (no positions) of all the neuron's trigger prefixes: a GIN-indexed
    necessary condition for a pattern that one prefix must match, checked exactly per prefix after.
    ``trigger_tokens`` / ``next_tokens``: the distinct tokens its trigger prefixes end with / are
    followed by.
    """

    __tablename__ = "neuron_search"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "layer", "neuron"], ["neurons.run_id", "neurons.layer", "neurons.neuron"],
            ondelete="CASCADE",
        ),
        Index("ix_neuron_search_terms", "terms", postgresql_using="gin"),
        Index("ix_neuron_search_trigger_tokens", "trigger_tokens", postgresql_using="gin"),
        Index("ix_neuron_search_next_tokens", "next_tokens", postgresql_using="gin"),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    terms: Mapped[Any] = mapped_column(TSVECTOR, nullable=False)
    trigger_tokens: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    next_tokens: Mapped[list[int]] = mapped_column(ARRAY(Integer))


class StoredSummary(Base):
    """The parts of a neuron's search summary that come from other tables, as the JSON a page shows
    (catalog/read/search.py): its top SUMMARY_TOKENS promoted tokens per projection convention and its
    strongest positive trigger (null without triggers). Built in the publishing transaction
    (catalog/store/search_index.py), so a page of 50 reads one row per neuron instead of probing
    value_tokens, tokens, triggers and prefixes about a dozen times per neuron."""

    __tablename__ = "neuron_summaries"

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    top_tokens_raw: Mapped[Any] = mapped_column(JSON, nullable=False)
    top_tokens_folded: Mapped[Any] = mapped_column(JSON, nullable=False)
    top_trigger: Mapped[Any] = mapped_column(JSON, nullable=True)


class SimilarList(Base):
    """A neuron's exact similar-neuron list in one space (key or value): the other neurons of the run
    with the highest cosine, best first, ties by (layer, neuron) (catalog/extract/neighbours.py).

    ``ids`` are flat ids ``layer * d_mlp + neuron``; the list is the head of the exact order that
    float32 rounding cannot have displaced, so its length may fall short of the run's list size. One
    row per neuron with arrays: a row per pair would be 50x the rows for nothing a search needs.
    """

    __tablename__ = "similar_lists"

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    space: Mapped[str] = mapped_column(String(5), primary_key=True)  # 'key' | 'value'
    layer: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    ids: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)
    cosines: Mapped[list[float]] = mapped_column(ARRAY(Float), nullable=False)


class TokenList(Base):
    """A token's exact ranking list under one order (``logit`` v_i . e_t or ``cosine``) and projection
    convention: the neurons of the run with the highest score, best first, ties by (layer, neuron)
    (catalog/extract/neighbours.py). ``ids`` are flat ids ``layer * d_mlp + neuron``."""

    __tablename__ = "token_lists"

    run_id: Mapped[int] = mapped_column(ForeignKey("extraction_runs.id", ondelete="CASCADE"), primary_key=True)
    convention: Mapped[str] = mapped_column(String(6), primary_key=True)  # 'raw' | 'folded'
    ranking: Mapped[str] = mapped_column(String(6), primary_key=True)  # 'logit' | 'cosine'
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ids: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)
    scores: Mapped[list[float]] = mapped_column(ARRAY(Float), nullable=False)


# --- annotations (part 4) ------------------------------------------------------------------------


class Annotator(Base):
    """A person who may write annotations; only a SHA-256 of their token is stored."""

    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # null: no token (imported from a file, or revoked); such an annotator cannot write
    token_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Annotation(Base):
    """One annotator's current annotation of one neuron of a catalog entry (a model, not a run).

    Keyed by (model, layer, neuron, annotator), so re-extracting the model keeps it; the run and
    weights it was made on are recorded per revision. ``revision`` is the number of the latest
    revision: a revision must name it as its base (optimistic concurrency, 409 when stale).
    """

    __tablename__ = "annotations"
    __table_args__ = (
        # one annotation per annotator and neuron; also serves "annotations of this neuron"
        UniqueConstraint("model_id", "layer", "neuron", "annotator_id", name="uq_annotations_neuron_annotator"),
        CheckConstraint(f"label IN ({', '.join(repr(x) for x in HUMAN_LABELS)})", name="label"),
        Index("ix_annotations_annotator_model", "annotator_id", "model_id", "layer"),
        # the search API's q pattern over descriptions
        Index("ix_annotations_description_tsv",
              func.to_tsvector(literal_column(f"'{TEXT_SEARCH_CONFIG}'::regconfig"), text("description")),
              postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("catalog_models.id", ondelete="RESTRICT"))
    layer: Mapped[int] = mapped_column(SmallInteger)
    neuron: Mapped[int] = mapped_column(Integer)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="RESTRICT"))
    revision: Mapped[int] = mapped_column(Integer)  # 1-based, the latest
    label: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text, default="")
    examples: Mapped[list[dict[str, int]]] = mapped_column(JSONB, default=list)  # [{document, position}]
    run_id: Mapped[int | None] = mapped_column(Integer)  # no FK: runs are deleted when superseded
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())



class AnnotationRevision(Base):
    """Every revision of an annotation, the latest included, as it was written."""

    __tablename__ = "annotation_revisions"

    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text, default="")
    examples: Mapped[list[dict[str, int]]] = mapped_column(JSONB, default=list)
    run_id: Mapped[int | None] = mapped_column(Integer)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UiSession(Base):
    """A signed-in browser of the review UI (issue 15). The cookie carries only a random id; the table
    keeps its SHA-256, so a copy of the table signs nobody in. Rotated at every sign-in, deleted at
    sign-out, revoked with the annotator; the CSRF token of its forms is random per session."""

    __tablename__ = "ui_sessions"
    __table_args__ = (Index("ix_ui_sessions_annotator_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    # Plain: the page must show it, and it is worthless without the cookie's id, which is stored hashed.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # absolute end
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# --- distributed extraction (part 7) ---------------------------------------------------------------


class RequestStatus(enum.StrEnum):
    queued = "queued"  # sent to the broker, no worker has taken it yet
    running = "running"  # a worker took it (attempt ``attempts``); ``holder`` names that process
    published = "published"  # its run is the catalog's current one (set in the publishing commit)
    failed = "failed"  # ``error`` says why; never retried
    cancelled = "cancelled"  # reserved for a cancel command; workers skip it like published/failed


REQUEST_DONE = (RequestStatus.published, RequestStatus.failed, RequestStatus.cancelled)


class ExtractionRequest(Base):
    """One ``extract --distributed``: the request a worker runs, and its lease (catalog/requests.py).

    A worker claims it by taking a session-level advisory lock keyed by its id (held while the
    worker lives) and incrementing ``attempts`` (the fencing token the publishing commit checks).
    ``status`` is text with a CHECK, not an enum type, so later parts (shards) can add states with a
    plain constraint swap.
    """

    __tablename__ = "extraction_requests"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'published', 'failed', 'cancelled')", name="status"),
        # the sweeper's and the follower's lookups; ``run_id``: the FK's ON DELETE SET NULL when
        # superseded runs are deleted
        Index("ix_extraction_requests_status", "status"),
        Index("ix_extraction_requests_run_id", "run_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)  # dataclasses.asdict(ExtractRequest)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.queued, server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # attempts started
    holder: Mapped[str | None] = mapped_column(Text)  # "hostname:pid" of the latest attempt's process
    run_id: Mapped[int | None] = mapped_column(ForeignKey("extraction_runs.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text)
    # set in the publishing commit: what `extract` prints about the run (run_id, name, n_layers,
    # d_mlp, timings as [stage, seconds] pairs in order); it outlives the run once that is replaced
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # the latest attempt's start
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when a sweeper last re-sent the task for a dead holder (cleared when an attempt starts)
    resent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
