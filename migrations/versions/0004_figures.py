"""Figures a reader can trust (part 5): baselines, label inputs, firing figures, projection conventions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

New nullable columns only, plus one change of key: value_tokens gains ``convention`` ('raw' for
every existing row, 'folded' for the final-norm gain folded into E) in its primary key.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEURON_FLOATS = (
    "gate_open_fraction", "abs_coefficient_p50", "abs_coefficient_p90", "abs_coefficient_p99",
    "negative_trigger_share", "agreement_shuffled", "agreement_folded", "agreement_top1", "agreement_negative",
    "next_token_rank_percentile", "next_token_rank_percentile_shuffled", "top_token_frequency",
    "label_contrast", "label_context", "label_confidence",
)
LAYER_FLOATS = (
    "mean_agreement_shuffled", "mean_agreement_folded", "agreement_top1_rate", "mean_agreement_negative",
    "mean_top_token_frequency", "median_rank_percentile", "median_rank_percentile_shuffled",
    "median_label_contrast", "median_label_context",
)
NEW_STATS = (*NEURON_FLOATS, "label_triggers")


def upgrade() -> None:
    op.add_column('catalog_models', sa.Column('causal', sa.Boolean(), server_default=sa.text('true'), nullable=False))
    op.add_column('extraction_runs', sa.Column('final_norm_gain', Vector(), nullable=True))
    op.add_column('extraction_runs', sa.Column('label_rule', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    for name in LAYER_FLOATS:
        op.add_column('layers', sa.Column(name, sa.Float(), nullable=True))
    for name in NEURON_FLOATS:
        op.add_column('neurons', sa.Column(name, sa.Float(), nullable=True))
    op.add_column('neurons', sa.Column('label_triggers', sa.Integer(), nullable=True))
    for name in NEW_STATS:
        op.create_index(f'ix_neurons_run_{name}', 'neurons', ['run_id', name, 'layer', 'neuron'], unique=False)
    op.add_column('prefixes', sa.Column('text_after', sa.Text(), nullable=True))
    op.add_column('value_tokens', sa.Column('convention', sa.String(length=6), server_default='raw', nullable=False))
    op.drop_constraint('pk_value_tokens', 'value_tokens', type_='primary')
    op.create_primary_key('pk_value_tokens', 'value_tokens', ['run_id', 'layer', 'neuron', 'convention', 'kind', 'rank'])
    op.drop_index('ix_value_tokens_run_token_rank', table_name='value_tokens')
    op.create_index('ix_value_tokens_run_token_rank', 'value_tokens', ['run_id', 'token_id', 'rank'], unique=False,
                    postgresql_where="kind = 'top' AND convention = 'raw'")
    op.create_index('ix_value_tokens_run_token_rank_folded', 'value_tokens', ['run_id', 'token_id', 'rank'],
                    unique=False, postgresql_where="kind = 'top' AND convention = 'folded'")


def downgrade() -> None:
    op.drop_index('ix_value_tokens_run_token_rank_folded', table_name='value_tokens')
    op.drop_index('ix_value_tokens_run_token_rank', table_name='value_tokens')
    op.execute("DELETE FROM value_tokens WHERE convention <> 'raw'")
    op.drop_constraint('pk_value_tokens', 'value_tokens', type_='primary')
    op.create_primary_key('pk_value_tokens', 'value_tokens', ['run_id', 'layer', 'neuron', 'kind', 'rank'])
    op.drop_column('value_tokens', 'convention')
    op.create_index('ix_value_tokens_run_token_rank', 'value_tokens', ['run_id', 'token_id', 'rank'], unique=False,
                    postgresql_where="kind = 'top'")
    op.drop_column('prefixes', 'text_after')
    for name in NEW_STATS:
        op.drop_index(f'ix_neurons_run_{name}', table_name='neurons')
    op.drop_column('neurons', 'label_triggers')
    for name in NEURON_FLOATS:
        op.drop_column('neurons', name)
    for name in LAYER_FLOATS:
        op.drop_column('layers', name)
    op.drop_column('extraction_runs', 'label_rule')
    op.drop_column('extraction_runs', 'final_norm_gain')
    op.drop_column('catalog_models', 'causal')
