"""Pattern search's prefix-first plan without heap reads (issue 15): the triggers' (run, document,
position) index carries the columns that plan reads.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

"Which neurons fire on these prefixes" joins up to 5,000 matching prefixes to their triggers. With
the plain index each of the ~30 triggers of a prefix is a random heap read in the 15M-row triggers
table of a GPT-2-XL-sized catalog (118k buffer reads, 7.9 s cold for ``q="a person"``); with
``layer, neuron, sign, coefficient`` included it is an index-only scan (0.29 s). The index cannot be
deduplicated any more: 864 MB instead of 155 MB at that size.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index('ix_triggers_run_document_position', table_name='triggers')
    op.create_index('ix_triggers_run_document_position', 'triggers', ['run_id', 'document', 'position'],
                    unique=False, postgresql_include=['layer', 'neuron', 'sign', 'coefficient'])


def downgrade() -> None:
    op.drop_index('ix_triggers_run_document_position', table_name='triggers')
    op.create_index('ix_triggers_run_document_position', 'triggers', ['run_id', 'document', 'position'], unique=False)
