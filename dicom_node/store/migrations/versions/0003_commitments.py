"""commitments: Storage Commitment transactions of the results sent to destinations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "commitments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("delivery", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("requested", sa.Text(), nullable=False),
        sa.Column("failed", sa.Text(), nullable=True),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("deadline", sa.DateTime(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=True),
        sa.Column("reported_by", sa.String(length=16), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["study_instance_uid"], ["studies.study_instance_uid"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "destination", "delivery"),
        sa.UniqueConstraint("transaction_uid"),
    )
    op.create_index("ix_commitments_deadline", "commitments", ["deadline"])
    op.create_index("ix_commitments_job_id", "commitments", ["job_id"])
    op.create_index("ix_commitments_state", "commitments", ["state"])
    op.create_index("ix_commitments_study_instance_uid", "commitments", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_commitments_study_instance_uid", table_name="commitments")
    op.drop_index("ix_commitments_state", table_name="commitments")
    op.drop_index("ix_commitments_job_id", table_name="commitments")
    op.drop_index("ix_commitments_deadline", table_name="commitments")
    op.drop_table("commitments")
