"""What a job's change of status brings, written in the transaction that makes the change: a finished
job's results file (service/jobs/results.py) and the webhook event of the status, which the webhook
outbox sends once that transaction commits (service/webhooks/service.py). Every path that moves a job
to succeeded, failed, cancelled or paused (the API, the runner, validation, the reaper) calls
`status_changed`; the trainer's checkpoint writes call `checkpoint_created`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.core.storage import Storage
from service.core.tables import JOB_TERMINAL as TERMINAL
from service.core.tables import Job
from service.jobs import results
from service.webhooks.service import emit

ANNOUNCED = (*TERMINAL, "paused")  # fine_tuning.job.<status>


def status_changed(session: Session, storage: Storage, job: Job, status: str) -> None:
    if status in TERMINAL:
        results.attach(session, storage, job)
    if status in ANNOUNCED:
        emit(session, job.project_id, f"fine_tuning.job.{status}", {"id": job.id})


def checkpoint_created(session: Session, job: Job, checkpoint_id: str, step: int, name: str) -> None:
    data = {"id": job.id, "checkpoint_id": checkpoint_id, "step_number": step, "fine_tuned_model_checkpoint": name}
    emit(session, job.project_id, "fine_tuning.job.checkpoint.created", data)
