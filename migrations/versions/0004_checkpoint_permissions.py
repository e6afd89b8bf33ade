"""checkpoint permissions (sharing a checkpoint with another project) and file expiry

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-20 12:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_permissions",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=64), nullable=False),
        sa.Column("granted_project_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["checkpoint_id"], ["checkpoints.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["granted_project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("checkpoint_id", "granted_project_id", name="uq_checkpoint_permissions_grant"),
        sa.UniqueConstraint("id"),
    )
    for column in ("checkpoint_id", "granted_project_id", "project_id"):
        op.create_index(op.f(f"ix_checkpoint_permissions_{column}"), "checkpoint_permissions", [column], unique=False)
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.BigInteger(), nullable=True))
        batch.create_index(batch.f("ix_files_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_index(batch.f("ix_files_expires_at"))
        batch.drop_column("expires_at")
    for column in ("checkpoint_id", "granted_project_id", "project_id"):
        op.drop_index(op.f(f"ix_checkpoint_permissions_{column}"), table_name="checkpoint_permissions")
    op.drop_table("checkpoint_permissions")
