"""Exact similar-neuron lists (part 10) replace the key-cosine HNSW index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

``similar_lists`` holds, per neuron and space, the other neurons with the highest cosine (exact,
catalog/extract/neighbours.py). Similar neurons no longer read an HNSW index, so the per-run
key-cosine indexes go (runs published before this revision have no lists: their similar-neuron
requests scan exactly). The value indexes stay for token ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'similar_lists',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('space', sa.String(length=5), nullable=False),
        sa.Column('layer', sa.SmallInteger(), nullable=False),
        sa.Column('neuron', sa.Integer(), nullable=False),
        sa.Column('ids', postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column('cosines', postgresql.ARRAY(sa.Float()), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['extraction_runs.id'], name=op.f('fk_similar_lists_run_id_extraction_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'space', 'layer', 'neuron', name=op.f('pk_similar_lists')),
    )
    names = op.get_bind().execute(sa.text(
        "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname LIKE 'ix_neurons_hnsw_key_cos_run_%'")).scalars().all()
    for name in names:
        op.execute(f'DROP INDEX IF EXISTS "{name}"')


def downgrade() -> None:
    # (the dropped key-cosine indexes are not rebuilt: similar neurons scan exactly without them)
    op.drop_table('similar_lists')
