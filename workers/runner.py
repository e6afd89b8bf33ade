"""Running one job: claim it, heartbeat while the trainer runs, and record how it ended."""

from __future__ import annotations

import logging
from typing import Any

from service.core.db import unit_of_work
from service.core.errors import ApiError
from service.core.settings import Settings
from service.core.storage import Storage
from service.core.tables import now
from service.jobs import repository
from service.jobs.service import fine_tuned_model_name
from workers.context import JobContext, LeaseLost, TrainingResult
from workers.lease import Heartbeat, claim, worker_identity
from workers.training import load_trainer

log = logging.getLogger(__name__)
DONE_MESSAGES = {
    "succeeded": "The job has successfully completed.",
    "paused": "Fine-tuning job paused; resume it to continue from its checkpoint.",
    "cancelled": "Fine-tuning job cancelled.",
}


def run_job(job_id: str, settings: Settings) -> None:
    worker_id = worker_identity()
    with unit_of_work(settings) as session:
        if not claim(session, job_id, worker_id, settings, "queued", "running"):
            log.info("job %s is not queued or is leased by another worker; nothing to do", job_id)
            return
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        repository.add_event(session, job, f"Fine-tuning job started (attempt {job.attempts}).")
    with Heartbeat(job_id, worker_id, settings) as heartbeat:
        try:
            ctx = JobContext.load(job_id, settings, Storage(settings.storage_dir), heartbeat)
            result = load_trainer(settings.trainer)(ctx)
        except LeaseLost:
            log.warning("job %s: lease lost; another worker owns it now", job_id)
            return
        except ApiError as exc:
            _finish(job_id, worker_id, settings, "failed", error=exc.as_job_error())
            return
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            error = {
                "code": "internal_error",
                "message": f"Training crashed: {type(exc).__name__}: {exc}",
                "param": None,
            }
            _finish(job_id, worker_id, settings, "failed", error=error)
            return
    _finish(job_id, worker_id, settings, result.status, result=result)


def _finish(
    job_id: str,
    worker_id: str,
    settings: Settings,
    status: str,
    *,
    error: dict[str, Any] | None = None,
    result: TrainingResult | None = None,
) -> None:
    with unit_of_work(settings) as session:
        job = repository.get_unscoped(session, job_id)
        if job is None or job.worker_id != worker_id or job.status != "running":
            log.warning("job %s changed hands before it finished; leaving it", job_id)
            return
        job.status = status
        job.worker_id, job.lease_expires_at = None, None
        job.cancel_requested, job.pause_requested = False, False
        if status != "paused":
            job.finished_at = now()
        if error:
            job.error = error
        if result and result.status == "succeeded":
            job.fine_tuned_model = result.fine_tuned_model or fine_tuned_model_name(job)
            job.trained_tokens = result.trained_tokens
        message = (
            error["message"] if error else (result.message if result and result.message else DONE_MESSAGES[status])
        )
        repository.add_event(session, job, message, level="error" if error else "info")
