"""Running one job: claim it, heartbeat while the trainer runs, and record how it ended."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from sqlalchemy.orm import Session

from service.core.errors import ApiError
from service.core.observability import JOB_ID
from service.core.queue import wake_training
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import Job, now
from service.fleet import repository as fleet
from service.jobs import repository
from service.jobs.outcomes import status_changed
from service.jobs.service import fine_tuned_model_name
from workers import shutdown
from workers.context import JobContext, LeaseLost, RankLost, StorageFull, TrainingResult
from workers.fleet import main_worker_id
from workers.lease import Heartbeat, claim, worker_identity
from workers.retry import in_transaction
from workers.training import load_trainer

log = logging.getLogger(__name__)
DONE_MESSAGES = {
    "succeeded": "The job has successfully completed.",
    "paused": "Fine-tuning job paused; resume it to continue from its checkpoint.",
    "cancelled": "Fine-tuning job cancelled.",
}


def run_job(job_id: str, settings: Settings) -> None:
    token = JOB_ID.set(job_id)  # on every log line of this job (service/core/observability.py)
    try:
        _run_job(job_id, settings)
    finally:
        JOB_ID.reset(token)
        done = main_worker_id(os.getppid())
        in_transaction(settings, lambda session: fleet.set_current_job(session, done, None, was=job_id))


def _run_job(job_id: str, settings: Settings) -> None:
    worker_id = worker_identity()
    if shutdown.requested():  # stopping before the job started: leave it to the next worker
        in_transaction(settings, lambda session: wake_training(session, job_id))
        return
    if not in_transaction(settings, lambda session: _start(session, job_id, worker_id, settings)):
        log.info("job %s is not queued or is leased by another worker; nothing to do", job_id)
        return
    ctx: JobContext | None = None
    ended = "failed"  # how the job ends here, for its trackers
    with Heartbeat(job_id, worker_id, settings) as heartbeat:
        try:
            ctx = JobContext.load(job_id, settings, storage_for(settings), heartbeat)
            result = load_trainer(settings.trainer)(ctx)
            ended = result.status
        except LeaseLost:
            log.warning("job %s: lease lost; another worker owns it now", job_id)
            ended = "requeued"
            return
        except StorageFull as exc:
            ended = "paused"
            _finish(job_id, worker_id, settings, "paused", message=str(exc), level="error", ran=_ran(ctx))
            return
        except RankLost as exc:
            log.warning("job %s: %s", job_id, exc)
            reason = str(exc)
            in_transaction(settings, lambda session: _retry_or_fail(session, job_id, worker_id, reason, settings))
            return
        except ApiError as exc:
            _finish(job_id, worker_id, settings, "failed", error=exc.as_job_error(), ran=_ran(ctx))
            return
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            error = {
                "code": "internal_error",
                "message": f"Training crashed: {type(exc).__name__}: {exc}",
                "param": None,
            }
            _finish(job_id, worker_id, settings, "failed", error=error, ran=_ran(ctx))
            return
        finally:
            if ctx is not None:
                with contextlib.suppress(LeaseLost):  # a tracker's warn event needs the lease; the run ends anyway
                    ctx.tracking.close(ended)
                ctx.drop_local_copies()
    ran = _ran(ctx)
    if result.status == "requeued":
        in_transaction(settings, lambda session: _requeue(session, job_id, worker_id, ran))
    else:
        _finish(job_id, worker_id, settings, result.status, result=result, ran=ran)


def _ran(ctx: JobContext | None) -> float:
    """The job's running seconds on this worker not yet counted (`JobContext.control` counts the rest)."""
    return ctx.untallied_seconds() if ctx is not None else 0.0


def _start(session: Session, job_id: str, worker_id: str, settings: Settings) -> bool:
    if not claim(session, job_id, worker_id, settings, "queued", "running"):
        return False
    job = repository.get_unscoped(session, job_id)
    assert job is not None
    repository.add_event(session, job, f"Fine-tuning job started (attempt {job.attempts}).")
    fleet.set_current_job(session, main_worker_id(os.getppid()), job_id)  # our `rft worker`'s row, if any
    return True


def _mine(session: Session, job_id: str, worker_id: str) -> Job | None:
    job = repository.get_unscoped(session, job_id)
    if job is None or job.worker_id != worker_id or job.status != "running":
        log.warning("job %s changed hands before it finished; leaving it", job_id)
        return None
    return job


def _requeue(session: Session, job_id: str, worker_id: str, ran: float) -> None:
    """This worker is stopping: back to the queue from the checkpoint the trainer just wrote, the
    attempt not counted (nothing failed), and a wake-up for the next worker once this commits."""
    job = _mine(session, job_id, worker_id)
    if job is None:
        return
    checkpoints = repository.checkpoints_of(session, job_id)
    step = checkpoints[-1].step_number if checkpoints else 0
    job.status, job.enqueued_at = "queued", time.time()
    job.running_seconds = (job.running_seconds or 0.0) + ran
    job.worker_id, job.lease_expires_at = None, None
    job.attempts = max(job.attempts - 1, 0)
    where = f"its checkpoint at step {step}" if checkpoints else "the start (no step had finished)"
    repository.add_event(session, job, f"Worker stopping; job requeued at step {step} and resumes from {where}.")
    wake_training(session, job_id)


def _retry_or_fail(session: Session, job_id: str, worker_id: str, reason: str, settings: Settings) -> None:
    """A rank of the job died or fell silent: back to the queue from the last checkpoint, this
    attempt counted as a lost worker's is, or failed once the attempts are spent."""
    job = _mine(session, job_id, worker_id)
    if job is None:
        return
    if job.attempts >= settings.max_attempts:
        job.status, job.finished_at = "failed", now()
        job.error = {
            "code": "rank_lost",
            "message": f"{reason}. Giving up after {job.attempts} attempts.",
            "param": None,
        }
        job.worker_id, job.lease_expires_at = None, None
        repository.add_event(session, job, job.error["message"], level="error")
        return
    job.status, job.enqueued_at = "queued", time.time()
    job.worker_id, job.lease_expires_at = None, None
    repository.add_event(
        session,
        job,
        f"{reason}. Job requeued (attempt {job.attempts + 1} of {settings.max_attempts}); it resumes from its "
        "last checkpoint.",
        level="warn",
    )
    wake_training(session, job_id)


def _finish(
    job_id: str,
    worker_id: str,
    settings: Settings,
    status: str,
    *,
    error: dict[str, Any] | None = None,
    result: TrainingResult | None = None,
    message: str | None = None,
    level: str = "info",
    ran: float = 0.0,
) -> None:
    def write(session: Session) -> None:
        job = _mine(session, job_id, worker_id)
        if job is None:
            return
        job.status = status
        job.running_seconds = (job.running_seconds or 0.0) + ran
        job.worker_id, job.lease_expires_at = None, None
        job.cancel_requested, job.pause_requested = False, False
        if status != "paused":
            job.finished_at = now()
        if error:
            job.error = error
        if result and result.status == "succeeded":
            job.fine_tuned_model = result.fine_tuned_model or fine_tuned_model_name(job)
            if result.trained_tokens is not None:  # else the sum the steps recorded (JobContext.metrics)
                job.trained_tokens = result.trained_tokens
        text = message or (error["message"] if error else (result.message if result and result.message else None))
        repository.add_event(session, job, text or DONE_MESSAGES[status], level="error" if error else level)
        status_changed(session, storage_for(settings), job, status)

    in_transaction(settings, write)
