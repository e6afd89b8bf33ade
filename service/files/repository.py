from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.pagination import paginate
from service.core.tables import File, Job, now


def unexpired() -> ColumnElement[bool]:
    """Files past their `expires_at` are gone at once, whether or not the expirer has deleted them yet."""
    return or_(File.expires_at.is_(None), File.expires_at > now())


def get(session: Session, subject: AuthSubject, file_id: str) -> File | None:
    return session.scalars(readable(File, subject).where(File.id == file_id, unexpired())).one_or_none()


def page(
    session: Session,
    subject: AuthSubject,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> tuple[Sequence[File], bool]:
    stmt = readable(File, subject).where(unexpired())
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return paginate(session, stmt, File, after=after, limit=limit, order=order)


def files_of_job(session: Session, job: Job) -> dict[str, File]:
    """The job's training and validation file rows by id (for workers, which act on a job id)."""
    ids = [job.training_file] + ([job.validation_file] if job.validation_file else [])
    stmt = select(File).where(File.project_id == job.project_id, File.id.in_(ids), unexpired())
    return {f.id: f for f in session.scalars(stmt)}


def expired(session: Session, limit: int) -> Sequence[File]:
    """Files of any project past their `expires_at`, oldest expiry first."""
    stmt = select(File).where(File.expires_at <= now()).order_by(File.expires_at, File.seq).limit(limit)
    return session.scalars(stmt).all()


def usage(session: Session, project_id: str) -> tuple[int, int]:
    """(files, bytes) the project stores."""
    stmt = select(func.count(File.seq), func.coalesce(func.sum(File.bytes), 0)).where(File.project_id == project_id)
    count, total = session.execute(stmt).one()
    return int(count), int(total)
