"""A search hit's top tokens and strongest trigger are stored per neuron (part 10): ``neuron_summaries``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

Every search page showed, per hit, its top promoted tokens and its strongest trigger, found through
about a dozen index probes per hit into value_tokens, tokens, triggers and prefixes: 3.2 ms of every
page of 50 at GPT-2-XL scale, whatever the search. The run's publishing transaction now writes them
once as JSON (catalog/store/search_index.py); this revision builds them for the runs already there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from catalog.store.search_index import build_neuron_summaries

    op.create_table(
        'neuron_summaries',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('layer', sa.SmallInteger(), nullable=False),
        sa.Column('neuron', sa.Integer(), nullable=False),
        sa.Column('top_tokens_raw', sa.JSON(), nullable=False),
        sa.Column('top_tokens_folded', sa.JSON(), nullable=False),
        sa.Column('top_trigger', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['extraction_runs.id'], name=op.f('fk_neuron_summaries_run_id_extraction_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'layer', 'neuron', name=op.f('pk_neuron_summaries')),
    )
    # every run with neuron rows (a run still being written gets its rows when it publishes them)
    bind = op.get_bind()
    runs = bind.execute(sa.text("SELECT DISTINCT run_id, layer FROM neurons ORDER BY 1, 2")).tuples().all()
    by_run: dict[int, list[int]] = {}
    for run_id, layer in runs:
        by_run.setdefault(run_id, []).append(layer)
    cur = bind.connection.driver_connection.cursor()
    for run_id, layers in by_run.items():
        build_neuron_summaries(cur, run_id, layers)


def downgrade() -> None:
    op.drop_table('neuron_summaries')
