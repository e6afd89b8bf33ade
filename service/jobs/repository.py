"""Every SQL query on jobs, their events, metrics and checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.ids import new_id
from service.core.pagination import paginate
from service.core.tables import Checkpoint, Job, JobEvent, JobMetric

RELEASE_LEASE = {"worker_id": None, "lease_expires_at": None}  # values that hand a job back


def get(session: Session, subject: AuthSubject, job_id: str) -> Job | None:
    return session.scalars(readable(Job, subject).where(Job.id == job_id)).one_or_none()


def count_waiting(session: Session, project_id: str) -> int:
    """The project's jobs validating their files or queued (what `max_queued_jobs` bounds)."""
    stmt = select(func.count(Job.seq)).where(
        Job.project_id == project_id, Job.status.in_(["validating_files", "queued"])
    )
    return int(session.scalar(stmt) or 0)


def get_unscoped(session: Session, job_id: str) -> Job | None:
    """For workers, which act on a job id they were handed, not on behalf of a caller."""
    return session.scalars(select(Job).where(Job.id == job_id)).one_or_none()


def by_idempotency_key(session: Session, subject: AuthSubject, key: str) -> Job | None:
    return session.scalars(readable(Job, subject).where(Job.idempotency_key == key)).one_or_none()


def page_jobs(
    session: Session, subject: AuthSubject, *, after: str | None, limit: int, metadata: dict[str, str]
) -> tuple[Sequence[Job], bool]:
    stmt = readable(Job, subject)
    for key, value in metadata.items():
        stmt = stmt.where(Job.metadata_[key].as_string() == value)
    return paginate(session, stmt, Job, after=after, limit=limit)


def page_events(
    session: Session, subject: AuthSubject, job_id: str, *, after: str | None, limit: int
) -> tuple[Sequence[JobEvent], bool]:
    stmt = readable(JobEvent, subject).where(JobEvent.job_id == job_id)
    return paginate(session, stmt, JobEvent, after=after, limit=limit)


def page_checkpoints(
    session: Session, subject: AuthSubject, job_id: str, *, after: str | None, limit: int
) -> tuple[Sequence[Checkpoint], bool]:
    stmt = readable(Checkpoint, subject).where(Checkpoint.job_id == job_id)
    return paginate(session, stmt, Checkpoint, after=after, limit=limit)


def transition(session: Session, job_id: str, from_states: Iterable[str], **values: Any) -> bool:
    """Conditional UPDATE: apply `values` only if the job is still in one of `from_states`."""
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(list(from_states))).values(**values)
    changed = session.execute(stmt.execution_options(synchronize_session=False)).rowcount == 1  # type: ignore[attr-defined]
    session.expire_all()
    return changed


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
) -> JobEvent | None:
    """Append an event; one whose `dedupe_key` the job already has is skipped (None)."""
    if dedupe_key is not None:
        seen = select(JobEvent.seq).where(JobEvent.job_id == job.id, JobEvent.dedupe_key == dedupe_key)
        if session.scalar(seen) is not None:
            return None
    event = JobEvent(
        id=new_id("ftevent-"),
        project_id=job.project_id,
        job_id=job.id,
        level=level,
        type=type,
        message=message,
        data=data,
        dedupe_key=dedupe_key,
    )
    session.add(event)
    session.flush()
    return event


def record_metrics(session: Session, job: Job, step: int, data: dict[str, Any]) -> bool:
    """Store a step's metrics once; a replayed step after a resume is ignored (False)."""
    seen = select(JobMetric.seq).where(JobMetric.job_id == job.id, JobMetric.step == step)
    if session.scalar(seen) is not None:
        return False
    session.add(JobMetric(project_id=job.project_id, job_id=job.id, step=step, data=data))
    session.flush()
    return True


def delete(session: Session, job: Job) -> None:
    """The job's rows, children first (SQLite enforces the foreign keys only where the pragma is on)."""
    for table in (Checkpoint, JobMetric, JobEvent):
        session.execute(table.__table__.delete().where(table.job_id == job.id))  # type: ignore[attr-defined]
    session.delete(job)
    session.flush()


def checkpoints_of(session: Session, job_id: str) -> Sequence[Checkpoint]:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)
    return session.scalars(stmt).all()


def get_checkpoint(session: Session, subject: AuthSubject, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    stmt = readable(Checkpoint, subject).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id)
    return session.scalars(stmt).one_or_none()


def checkpoint_named(session: Session, project_id: str, model_name: str) -> Checkpoint | None:
    """The project's checkpoint named `model_name` (a job's final model is one of them)."""
    stmt = select(Checkpoint).where(
        Checkpoint.project_id == project_id, Checkpoint.fine_tuned_model_checkpoint == model_name
    )
    return session.scalars(stmt).first()
