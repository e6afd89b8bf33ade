"""Every query on the `workers` table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.core.tables import Worker


def report(session: Session, worker_id: str, at: float, **capabilities: Any) -> None:
    """Insert the worker's row, or renew its heartbeat and capabilities (never its current job)."""
    values = {**capabilities, "heartbeat_at": at}
    if session.execute(update(Worker).where(Worker.id == worker_id).values(**values)).rowcount == 0:  # type: ignore[attr-defined]
        session.add(Worker(id=worker_id, started_at=at, current_job_id=None, **values))
    session.flush()


def remove(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def set_current_job(session: Session, worker_id: str, job_id: str | None, *, was: str | None = None) -> None:
    """Record the job a worker runs (None: it finished `was`, unless it already took another)."""
    stmt = update(Worker).where(Worker.id == worker_id)
    if was is not None:
        stmt = stmt.where(Worker.current_job_id == was)
    session.execute(stmt.values(current_job_id=job_id))


def all_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.started_at, Worker.id)))


def live(session: Session, since: float) -> list[Worker]:
    """The workers whose last heartbeat is newer than `since`."""
    stmt = select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.started_at, Worker.id)
    return list(session.scalars(stmt))
