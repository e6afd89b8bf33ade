"""the fleet: worker heartbeat rows and what each job needs of a worker

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 23:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=256), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("device_type", sa.String(length=16), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("device_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("engines", sa.JSON(), nullable=False),
        sa.Column("current_job_id", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_workers_heartbeat_at"), "workers", ["heartbeat_at"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("needs_memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("needs_engine", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("needs_engine")
        batch.drop_column("needs_memory_bytes")
    op.drop_index(op.f("ix_workers_heartbeat_at"), table_name="workers")
    op.drop_table("workers")
