"""Prefixes keep their lexemes (part 10): a stored ``tsv`` column, and the GIN index over it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

The GIN index over ``to_tsvector(text)`` finds candidate prefixes, but a phrase ("a person") or a
word excluded needs each candidate checked again, and with an expression index that check parses
the prefix's text once more: about 0.1 ms a prefix, most of a phrase search at GPT-2-XL scale.
Stored, the check reads the lexemes instead (the approach Postgres' manual recommends, 12.2.2). The
same lexemes, so every pattern matches the same prefixes as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0011'
down_revision: str | Sequence[str] | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE prefixes ADD COLUMN tsv tsvector "
               "GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, text)) STORED")
    op.execute("DROP INDEX IF EXISTS ix_prefixes_text_tsv")
    op.execute("CREATE INDEX ix_prefixes_tsv ON prefixes USING gin (tsv)")
    # detailed statistics, as for the expression before (0002): rare words must look rare to the planner
    op.execute("ALTER TABLE prefixes ALTER COLUMN tsv SET STATISTICS 10000")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_prefixes_tsv")
    op.execute("ALTER TABLE prefixes DROP COLUMN tsv")
    op.execute("CREATE INDEX ix_prefixes_text_tsv ON prefixes USING gin (to_tsvector('simple'::regconfig, text))")
    op.execute("ALTER INDEX ix_prefixes_text_tsv ALTER COLUMN 1 SET STATISTICS 10000")
