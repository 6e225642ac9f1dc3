"""destination_outages, and the jobs' delivery waits: an unreachable destination is waited out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

A destination that refuses connections, times out, rejects or aborts the association is an outage,
not a job failure (dicom_node.send.outages): ``destination_outages`` holds one row per destination
that is unreachable now, shared by every worker, so that an outage is logged once when it starts
and once when it ends, and so that the workers try it one at a time while it is down
(``next_try_at``). A job whose delivery waits out an outage records which destinations, since when,
and how many tries it made (``jobs.awaiting_delivery_to``, ``awaiting_delivery_since``,
``delivery_attempts``); those tries spend none of its ``max_attempts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "destination_outages",
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("destination"),
    )
    op.add_column("jobs", sa.Column("awaiting_delivery_to", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("awaiting_delivery_since", sa.DateTime(), nullable=True))
    op.add_column("jobs", sa.Column("delivery_attempts", sa.Integer(), nullable=False,
                                    server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("delivery_attempts")
        batch.drop_column("awaiting_delivery_since")
        batch.drop_column("awaiting_delivery_to")
    op.drop_table("destination_outages")
