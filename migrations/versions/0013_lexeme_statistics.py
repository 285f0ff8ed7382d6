"""Lexeme statistics sized for the planner's questions (part 10): targets 1,000 instead of 10,000.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05

Revisions 0002 and 0011 gave the lexeme sets (``neuron_search.terms``, ``prefixes.tsv``) statistics
target 10,000, so that a rare word looks rare to the planner (with the default 100 it was estimated
at 0.5% of the neurons, and a rare word's search walked every neuron: 970 ms against 1.4 ms). But
each statement with ``@@`` on them is planned through the whole most-common-lexeme list: 45,365
lexemes at GPT-2-XL scale, about 2 ms of planning per statement, and a word's search plans three or
four of them. At 1,000 the list holds about 10,000 lexemes: a word outside it is estimated below the
least common one listed, still rare enough for the GIN index, and a word common enough to change a
plan (thousands of neurons) is in the list.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0013'
down_revision: str | Sequence[str] | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _target(n: int) -> None:
    op.execute(f"ALTER TABLE neuron_search ALTER COLUMN terms SET STATISTICS {n}")
    op.execute(f"ALTER TABLE prefixes ALTER COLUMN tsv SET STATISTICS {n}")
    op.execute("ANALYZE neuron_search, prefixes")


def upgrade() -> None:
    _target(1000)


def downgrade() -> None:
    _target(10000)
