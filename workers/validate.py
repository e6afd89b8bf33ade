"""File validation for a job: every line of both files checked before the job may queue."""

from __future__ import annotations

import time

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import now
from service.files.repository import files_of_job
from service.files.service import check_job_files
from service.fleet import service as fleet
from service.jobs import repository
from service.jobs.outcomes import status_changed
from workers.lease import claim, worker_identity


def validate_job(job_id: str, settings: Settings) -> None:
    with unit_of_work(settings) as session:
        if not claim(session, job_id, worker_identity(), settings, "validating_files", "validating_files"):
            return
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        files = {i: (f.filename, f.sha256, f.storage_key) for i, f in files_of_job(session, job).items()}
        training_file, validation_file = job.training_file, job.validation_file
    error, notes = check_job_files(settings, files, training_file, validation_file)
    with unit_of_work(settings) as session:
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        if error:
            if repository.transition(
                session,
                job_id,
                ["validating_files"],
                status="failed",
                error=error,
                finished_at=now(),
                **repository.RELEASE_LEASE,
            ):
                repository.add_event(session, job, error["message"], level="error")
                status_changed(session, storage_for(settings), job, "failed")
            return
        if repository.transition(
            session, job_id, ["validating_files"], status="queued", enqueued_at=time.time(), **repository.RELEASE_LEASE
        ):
            for level, message in notes:
                repository.add_event(session, job, message, level=level)
            repository.add_event(session, job, "Files validated; the job is queued for training.")
            fleet.wake(session, settings, job_id)
