"""Runs made of shards (part 8): shard rows with leases, their serialised states, resumable runs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

``run_status`` gains ``interrupted`` (a run whose process ended: resumable) and ``cancelled``.
``extraction_runs`` gains the request as given, the plan, the step reached and the driver.
``run_shards`` holds one row per shard with its lease (holder, expiry, attempt); ``shard_states``
a done shard's state per layer, written in the transaction that marks it done.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # New enum values may not be used in the transaction that adds them; nothing here uses them.
    op.execute("ALTER TYPE run_status ADD VALUE IF NOT EXISTS 'interrupted'")
    op.execute("ALTER TYPE run_status ADD VALUE IF NOT EXISTS 'cancelled'")
    op.add_column('extraction_runs', sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('extraction_runs', sa.Column('plan', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('extraction_runs', sa.Column('step', sa.String(length=16), nullable=True))
    op.add_column('extraction_runs', sa.Column('driver', sa.String(length=16), server_default=sa.text("'local'"),
                                               nullable=False))
    op.create_table('run_shards',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('doc_start', sa.BigInteger(), nullable=False),
    sa.Column('doc_stop', sa.BigInteger(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('byte_offset', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=10), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('holder', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('done_tokens', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('state_bytes', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.CheckConstraint("kind IN ('pass', 'ablation')", name=op.f('ck_run_shards_kind')),
    sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name=op.f('ck_run_shards_status')),
    sa.ForeignKeyConstraint(['run_id'], ['extraction_runs.id'], name=op.f('fk_run_shards_run_id_extraction_runs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'kind', 'index', name=op.f('pk_run_shards'))
    )
    op.create_table('shard_states',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('layer', sa.SmallInteger(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['run_id', 'kind', 'index'], ['run_shards.run_id', 'run_shards.kind', 'run_shards.index'],
                            name=op.f('fk_shard_states_run_id_run_shards'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'kind', 'index', 'layer', name=op.f('pk_shard_states'))
    )


def downgrade() -> None:
    op.drop_table('shard_states')
    op.drop_table('run_shards')
    op.drop_column('extraction_runs', 'driver')
    op.drop_column('extraction_runs', 'step')
    op.drop_column('extraction_runs', 'plan')
    op.drop_column('extraction_runs', 'request')
    # Postgres cannot drop an enum value: put runs in the new states back in old ones, keep the values.
    op.execute("UPDATE extraction_runs SET status = 'failed' WHERE status IN ('interrupted', 'cancelled')")
