"""instances.set_aside_reason and jobs.note: an instance later stages could not read is set aside.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

An acknowledged instance whose content the completion sweep or a model's pipeline cannot read
(a malformed element past the header the receiver checks, a truncated file) is set aside: its
reason is recorded, it is left out of routing and of the jobs' inputs, and the rest of its study is
processed. A job that ran without some of its study's instances says which, and why, in its note.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("set_aside_reason", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("note")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("set_aside_reason")
