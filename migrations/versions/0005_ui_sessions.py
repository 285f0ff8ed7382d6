"""Server-side UI sessions (issue 15): the cookie holds a random id, the table its SHA-256.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

One new table. Sessions belong to an annotator (deleted with them); the CSRF token of a session's
forms is random per session. Nothing existing changes: the old cookie (the raw token) is simply no
longer read, so everyone signs in once more.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('ui_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('id_sha256', sa.String(length=64), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_ui_sessions_annotator_id_annotators'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ui_sessions')),
    sa.UniqueConstraint('id_sha256', name=op.f('uq_ui_sessions_id_sha256'))
    )
    op.create_index('ix_ui_sessions_annotator_id', 'ui_sessions', ['annotator_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_ui_sessions_annotator_id', table_name='ui_sessions')
    op.drop_table('ui_sessions')
