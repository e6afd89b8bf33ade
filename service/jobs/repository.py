"""Every SQL query on jobs, their events, metrics, checkpoints and leases."""

from __future__ import annotations

import time
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


def metrics_of(session: Session, job_id: str) -> list[tuple[int, dict[str, Any]]]:
    """The job's recorded `(step, metrics)`, in step order."""
    stmt = select(JobMetric.step, JobMetric.data).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
    return [(int(step), dict(data)) for step, data in session.execute(stmt)]


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


# -- leases: who runs a job is decided by its row (workers/lease.py holds the policy) ---------------


def claim_lease(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    from_status: str,
    to_status: str,
    running_limit: int | None = None,
) -> bool:
    """One conditional UPDATE: the job from `from_status` to `to_status` under `worker_id`'s lease,
    if nobody holds a live one and (where `running_limit` is given) its project runs fewer jobs than
    that. Counted in the UPDATE itself; on PostgreSQL two workers claiming at the same instant can
    each see the other's job as not yet running and overshoot by one: a fairness bound, not a ledger."""
    t = time.time()
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == from_status,
            (Job.lease_expires_at.is_(None)) | (Job.lease_expires_at < t),
        )
        .values(
            status=to_status,
            worker_id=worker_id,
            lease_expires_at=t + lease_seconds,
            heartbeat_at=t,
            attempts=Job.attempts + (1 if from_status == "queued" else 0),
        )
    )
    if running_limit is not None:
        project = select(Job.project_id).where(Job.id == job_id).scalar_subquery()
        running = select(func.count(Job.seq)).where(Job.project_id == project, Job.status == "running")
        stmt = stmt.where(running.scalar_subquery() < running_limit)
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def project_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.project_id).where(Job.id == job_id))


def count_running(session: Session, project_id: str) -> int:
    return int(
        session.scalar(select(func.count(Job.seq)).where(Job.project_id == project_id, Job.status == "running")) or 0
    )


def backdate_queued(session: Session, job_id: str, enqueued_at: float) -> bool:
    """Set a still-queued job's `enqueued_at` (the reaper re-wakes jobs queued too long)."""
    stmt = update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=enqueued_at)
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Extend `worker_id`'s lease; False where it no longer holds the job."""
    t = time.time()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id)
        .values(heartbeat_at=t, lease_expires_at=t + lease_seconds)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def lapsed_leases(session: Session, t: float) -> Sequence[Job]:
    """Running jobs whose lease ran out before `t` (their worker stopped renewing it)."""
    return session.scalars(select(Job).where(Job.status == "running", Job.lease_expires_at < t)).all()


def release_lapsed(session: Session, job_id: str, t: float, **values: Any) -> bool:
    """Hand back a job whose lease lapsed before `t`, setting `values`; False where it was renewed meanwhile."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.lease_expires_at < t)
        .values(**RELEASE_LEASE, **values)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def waiting_since_before(session: Session, t: float) -> Sequence[Job]:
    """Jobs validating files or queued whose wake-up was sent before `t`."""
    stmt = select(Job).where(Job.status.in_(["validating_files", "queued"]), Job.enqueued_at < t)
    return session.scalars(stmt).all()


# -- checkpoints, as the trainer writes them ---------------------------------------------------------


def checkpoint_at(session: Session, job_id: str, step: int) -> Checkpoint | None:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step_number == step)
    return session.scalars(stmt).one_or_none()


def record_checkpoint(session: Session, job: Job, step: int, name: str, key: str, metrics: dict[str, Any]) -> str:
    """The checkpoint row of `step` (its metrics refreshed where it exists): the commit point of a
    checkpoint whose folder is written. Its id."""
    existing = checkpoint_at(session, job.id, step)
    if existing is not None:
        existing.metrics = metrics
        return str(existing.id)
    ckpt = Checkpoint(
        id=new_id("ftckpt-"),
        project_id=job.project_id,
        job_id=job.id,
        step_number=step,
        fine_tuned_model_checkpoint=name,
        metrics=metrics,
        storage_key=key,
    )
    session.add(ckpt)
    session.flush()
    return ckpt.id


def delete_checkpoints_except(session: Session, job_id: str, keep_steps: set[int]) -> list[str]:
    """Delete the job's checkpoint rows whose step is not in `keep_steps`; their storage keys."""
    doomed = [c for c in checkpoints_of(session, job_id) if c.step_number not in keep_steps]
    for ckpt in doomed:
        session.delete(ckpt)
    return [c.storage_key for c in doomed]
