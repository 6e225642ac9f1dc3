"""jobs.claimed_at: when a worker last claimed the job (the running job's age in the metrics).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21

Jobs running when the database is upgraded have no claim time; the monitoring falls back to their
``not_before`` for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("claimed_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("claimed_at")
