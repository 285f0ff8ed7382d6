"""Runs driven by a queue (part 9): when each shard's and each step's message was last sent.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

A run whose shards run on Celery workers is re-driven from Postgres, never from the broker's
memory: ``run_shards.sent_at`` and ``extraction_runs.step_sent_at`` say when a message last went
out (a sweep re-sends what a lost message or a dead worker left behind), ``step_holder`` who runs
the run's current step (merge or finish) and ``step_attempts`` how often it was started, so that
a step that kills its worker every time fails the run instead of looping.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('run_shards', sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('extraction_runs', sa.Column('step_sent_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('extraction_runs', sa.Column('step_holder', sa.Text(), nullable=True))
    op.add_column('extraction_runs', sa.Column('step_attempts', sa.Integer(), server_default=sa.text('0'),
                                               nullable=False))


def downgrade() -> None:
    op.drop_column('extraction_runs', 'step_attempts')
    op.drop_column('extraction_runs', 'step_holder')
    op.drop_column('extraction_runs', 'step_sent_at')
    op.drop_column('run_shards', 'sent_at')
