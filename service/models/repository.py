"""Every SQL query the models domain makes: the project's fine-tuned models and checkpoints, and those
other projects shared with it."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.tables import JOB_TERMINAL, Checkpoint, Job


def fine_tuned_models(session: Session, subject: AuthSubject) -> list[tuple[str, int, str]]:
    """(name, created, owner project) of the project's final models and every checkpoint it owns or was
    granted, newest first."""
    finals = readable(Job, subject).where(Job.fine_tuned_model.is_not(None))
    names = {
        job.fine_tuned_model: (job.finished_at or job.created_at, job.project_id) for job in session.scalars(finals)
    }
    for ckpt in session.scalars(readable(Checkpoint, subject, shared=True)):
        names.setdefault(ckpt.fine_tuned_model_checkpoint, (ckpt.created_at, ckpt.project_id))
    return sorted(((n, c, o) for n, (c, o) in names.items() if n), key=lambda item: (-item[1], item[0]))


def checkpoint_named(session: Session, project_id: str, model_name: str) -> Checkpoint | None:
    """The project's own checkpoint named `model_name` (a job's final model is one of them)."""
    stmt = readable(Checkpoint, AuthSubject.acting_for(project_id)).where(
        Checkpoint.fine_tuned_model_checkpoint == model_name
    )
    return session.scalars(stmt).first()


def usable_checkpoint(session: Session, project_id: str, model_name: str) -> Checkpoint | None:
    """The checkpoint named `model_name` that the project owns or was granted: what it may chat with or train from."""
    stmt = readable(Checkpoint, AuthSubject.acting_for(project_id), shared=True).where(
        Checkpoint.fine_tuned_model_checkpoint == model_name
    )
    return session.scalars(stmt.order_by(Checkpoint.seq)).first()


def job_of(session: Session, checkpoint: Checkpoint) -> Job:
    """The job that wrote `checkpoint` (its base model, its status), whoever asks."""
    return session.scalars(select(Job).where(Job.id == checkpoint.job_id)).one()


def owned_job_with_model(session: Session, subject: AuthSubject, model_name: str) -> Job | None:
    """The caller's job whose final model is `model_name`."""
    return session.scalars(readable(Job, subject).where(Job.fine_tuned_model == model_name)).first()


def checkpoints_of_job(session: Session, job_id: str) -> Sequence[Checkpoint]:
    return session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)).all()


def unfinished_jobs(session: Session) -> Sequence[Job]:
    """Jobs of any project not yet finished (few: each project's queue is capped)."""
    return session.scalars(select(Job).where(Job.status.not_in(JOB_TERMINAL)).order_by(Job.seq)).all()
