"""Every SQL query of sharing and deleting checkpoints: the owner's permission rows and checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.pagination import paginate
from service.core.tables import Checkpoint, CheckpointPermission, Job, Project


def owned_checkpoint(session: Session, subject: AuthSubject, name: str) -> Checkpoint | None:
    """The caller's own checkpoint named `name`: only an owner manages its permissions."""
    stmt = readable(Checkpoint, subject).where(Checkpoint.fine_tuned_model_checkpoint == name)
    return session.scalars(stmt.order_by(Checkpoint.seq)).first()


def project_exists(session: Session, project_id: str) -> bool:
    return session.scalar(select(Project.seq).where(Project.id == project_id)) is not None


def job_status(session: Session, job_id: str) -> str:
    return str(session.scalar(select(Job.status).where(Job.id == job_id)))


def permission_for(
    session: Session, subject: AuthSubject, checkpoint: Checkpoint, project_id: str
) -> CheckpointPermission | None:
    stmt = readable(CheckpointPermission, subject).where(
        CheckpointPermission.checkpoint_id == checkpoint.id, CheckpointPermission.granted_project_id == project_id
    )
    return session.scalars(stmt).one_or_none()


def get_permission(
    session: Session, subject: AuthSubject, checkpoint: Checkpoint, permission_id: str
) -> CheckpointPermission | None:
    stmt = readable(CheckpointPermission, subject).where(
        CheckpointPermission.checkpoint_id == checkpoint.id, CheckpointPermission.id == permission_id
    )
    return session.scalars(stmt).one_or_none()


def page_permissions(
    session: Session,
    subject: AuthSubject,
    checkpoint: Checkpoint,
    *,
    project_id: str | None,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> tuple[Sequence[CheckpointPermission], bool]:
    stmt = readable(CheckpointPermission, subject).where(CheckpointPermission.checkpoint_id == checkpoint.id)
    if project_id is not None:
        stmt = stmt.where(CheckpointPermission.granted_project_id == project_id)
    return paginate(session, stmt, CheckpointPermission, after=after, limit=limit, order=order)


def delete_checkpoints(session: Session, checkpoints: Sequence[Checkpoint]) -> None:
    """The rows of `checkpoints` and their permissions (explicitly: SQLite cascades only with its pragma on)."""
    ids = [c.id for c in checkpoints]
    session.execute(delete(CheckpointPermission).where(CheckpointPermission.checkpoint_id.in_(ids)))
    session.execute(delete(Checkpoint).where(Checkpoint.id.in_(ids)))
    session.flush()
