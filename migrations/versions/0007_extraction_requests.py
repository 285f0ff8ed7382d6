"""Distributed extraction (part 7): one row per ``extract --distributed`` request.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

One new table. A worker claims a request by taking a session-level advisory lock keyed by its id and
incrementing ``attempts``; the commit that publishes the run checks that attempt and marks the
request ``published`` (catalog/requests.py). ``status`` is text with a CHECK so that later parts can
add states without an enum type change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('extraction_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='queued', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('holder', sa.Text(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resent_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'published', 'failed', 'cancelled')",
                       name=op.f('ck_extraction_requests_status')),
    sa.ForeignKeyConstraint(['run_id'], ['extraction_runs.id'], name=op.f('fk_extraction_requests_run_id_extraction_runs'),
                            ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_extraction_requests'))
    )
    op.create_index('ix_extraction_requests_status', 'extraction_requests', ['status'], unique=False)
    op.create_index('ix_extraction_requests_run_id', 'extraction_requests', ['run_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_extraction_requests_run_id', table_name='extraction_requests')
    op.drop_index('ix_extraction_requests_status', table_name='extraction_requests')
    op.drop_table('extraction_requests')
