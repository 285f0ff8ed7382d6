"""Exact neighbour lists (part 10) replace the HNSW indexes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

``similar_lists`` holds, per neuron and space, the other neurons with the highest cosine, and
``token_lists``, per token, order and projection convention, the neurons with the highest score:
both exact (catalog/extract/neighbours.py). Nothing reads the per-run HNSW indexes any more, so they
go: a request that a list cannot answer, and every request on a run published before this revision,
scores every vector in range.
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
    op.create_table(
        'token_lists',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('convention', sa.String(length=6), nullable=False),
        sa.Column('ranking', sa.String(length=6), nullable=False),
        sa.Column('token_id', sa.Integer(), nullable=False),
        sa.Column('ids', postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column('scores', postgresql.ARRAY(sa.Float()), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['extraction_runs.id'], name=op.f('fk_token_lists_run_id_extraction_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'convention', 'ranking', 'token_id', name=op.f('pk_token_lists')),
    )
    names = op.get_bind().execute(sa.text(
        "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname LIKE 'ix\\_neurons\\_hnsw\\_%'")).scalars().all()
    for name in names:
        op.execute(f'DROP INDEX IF EXISTS "{name}"')


def downgrade() -> None:
    # (the dropped HNSW indexes are not rebuilt: requests scan exactly without them)
    op.drop_table('token_lists')
    op.drop_table('similar_lists')
