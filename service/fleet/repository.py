"""Every query on the `workers` and `throughput` tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.tables import Throughput, Worker


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


def throughput(session: Session, model: str, mode: str, devices: list[str] | None = None) -> list[Throughput]:
    """The model's throughput figures in `mode` (of `devices`, where given), the freshest first."""
    stmt = select(Throughput).where(Throughput.model == model, Throughput.mode == mode)
    if devices is not None:
        stmt = stmt.where(Throughput.device.in_(devices))
    return list(session.scalars(stmt.order_by(Throughput.updated_at.desc())))


def save_throughput(session: Session, key: dict[str, str], update_row: Any, first: dict[str, Any]) -> None:
    """Fold one step into the figure at `key` (model, device, mode): `update_row(row)` changes an
    existing row (locked), else a row of `first` is inserted; a concurrent insert of the same key wins."""
    row = session.scalars(select(Throughput).filter_by(**key).with_for_update()).one_or_none()
    if row is not None:
        update_row(row)
        return
    try:
        with session.begin_nested():
            session.add(Throughput(**key, **first))
    except IntegrityError:
        pass  # another job's worker recorded the first figure at the same moment: one step is not missed much
