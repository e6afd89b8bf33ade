"""experiment tracking and pre-flight: the workers' device names and trackers, throughput figures,
and each job's running seconds (its wall-clock budget)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 21:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "throughput",
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("seconds_per_sequence", sa.Float(), nullable=False),
        sa.Column("eval_seconds_per_sequence", sa.Float(), nullable=True),
        sa.Column("max_completion_tokens", sa.Integer(), nullable=False),
        sa.Column("tokens_per_second", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", "device", "mode"),
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("device_name", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("trackers", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("running_seconds", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("running_seconds")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("trackers")
        batch.drop_column("device_name")
    op.drop_table("throughput")
