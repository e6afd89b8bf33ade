"""Every SQL query the models domain makes: the project's fine-tuned models and checkpoints."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.tables import Checkpoint, Job


def fine_tuned_models(session: Session, subject: AuthSubject) -> list[tuple[str, int]]:
    """(name, created) of the project's final models and every checkpoint, newest first."""
    finals = readable(Job, subject).where(Job.fine_tuned_model.is_not(None))
    names = {job.fine_tuned_model: job.finished_at or job.created_at for job in session.scalars(finals)}
    for ckpt in session.scalars(readable(Checkpoint, subject)):
        names.setdefault(ckpt.fine_tuned_model_checkpoint, ckpt.created_at)
    return sorted(((n, c) for n, c in names.items() if n), key=lambda item: (-item[1], item[0]))


def checkpoint_named(session: Session, project_id: str, model_name: str) -> Checkpoint | None:
    """The project's checkpoint named `model_name` (a job's final model is one of them)."""
    stmt = select(Checkpoint).where(
        Checkpoint.project_id == project_id, Checkpoint.fine_tuned_model_checkpoint == model_name
    )
    return session.scalars(stmt).first()
