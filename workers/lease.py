"""Who runs a job is decided by the job row, never by the broker.

A worker claims a queued job with one conditional UPDATE that also sets its lease; a heartbeat
thread renews the lease while the job runs. A second delivery of the same message finds the job no
longer `queued` and does nothing. The reaper puts jobs whose lease lapsed (a killed worker) back in
the queue, up to `max_attempts`, and re-sends wake-ups for jobs a lost message left waiting.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import nullcontext

from sqlalchemy.orm import Session

from service.core.limits import limits_for
from service.core.observability import RECLAIM_KEY
from service.core.queue import wake_validation
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import now
from service.fleet import service as fleet
from service.jobs import repository
from service.jobs.outcomes import status_changed

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def claim(session: Session, job_id: str, worker_id: str, settings: Settings, from_status: str, to_status: str) -> bool:
    """Move the job from `from_status` to `to_status` under our lease, if nobody holds a live one
    and (starting a queued job) its project runs fewer jobs than its `max_running_jobs`."""
    project_id = repository.project_of(session, job_id)
    if from_status != "queued" or project_id is None:
        return repository.claim_lease(session, job_id, worker_id, settings.lease_seconds, from_status, to_status)
    limit = limits_for(settings, project_id, lambda: nullcontext(session)).max_running_jobs
    if repository.claim_lease(session, job_id, worker_id, settings.lease_seconds, from_status, to_status, limit):
        return True
    _defer_if_at_limit(session, job_id, project_id, limit, settings)
    return False


def _defer_if_at_limit(session: Session, job_id: str, project_id: str, limit: int, settings: Settings) -> None:
    """A queued job refused for its project's running limit stays queued; backdating `enqueued_at`
    makes the reaper wake it again within about two reaper intervals, when a slot may be free."""
    running = repository.count_running(session, project_id)
    if running < limit:
        return  # refused for another reason (not queued, leased): not ours to touch
    wake_at = time.time() - settings.stale_queued_seconds + 2 * settings.reaper_interval_seconds
    if repository.backdate_queued(session, job_id, wake_at):
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        repository.add_event(
            session,
            job,
            f"Waiting for a training slot: project {project_id} runs {running} jobs, its limit "
            f"(max_running_jobs) is {limit}.",
            dedupe_key=f"running-limit:{running}:{limit}",
        )


def renew(session: Session, job_id: str, worker_id: str, settings: Settings) -> bool:
    """Extend our lease; False means we lost it (the reaper gave the job to someone else)."""
    return repository.renew_lease(session, job_id, worker_id, settings.lease_seconds)


class Heartbeat:
    """Renews the lease from a thread until stopped; `lost` is set if the lease was taken away."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings) -> None:
        from service.core.db import unit_of_work

        self._unit_of_work = unit_of_work
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.heartbeat_seconds + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with self._unit_of_work(self.settings) as session:
                    if not renew(session, self.job_id, self.worker_id, self.settings):
                        self.lost.set()
                        return
            except Exception:
                log.exception("heartbeat for %s failed; retrying", self.job_id)


def reap(session: Session, settings: Settings) -> dict[str, int]:
    """Requeue running jobs whose lease lapsed; fail those out of attempts; re-wake stale ones."""
    t = time.time()
    counts = {"requeued": 0, "failed": 0, "rewoken": 0}
    for job in repository.lapsed_leases(session, t):
        if job.attempts >= settings.max_attempts:
            error: dict[str, str | None] = {
                "code": "worker_lost",
                "message": f"The worker running this job stopped responding {job.attempts} times "
                f"(no heartbeat for {settings.lease_seconds:.0f}s); giving up after {settings.max_attempts} attempts.",
                "param": None,
            }
            if repository.release_lapsed(session, job.id, t, status="failed", error=error, finished_at=now()):
                repository.add_event(session, job, str(error["message"]), level="error")
                status_changed(session, storage_for(settings), job, "failed")
                counts["failed"] += 1
        elif repository.release_lapsed(session, job.id, t, status="queued", enqueued_at=t):
            repository.add_event(
                session,
                job,
                f"Worker stopped responding; job requeued (attempt {job.attempts + 1} of "
                f"{settings.max_attempts}) and resumes from its last checkpoint.",
                level="warn",
                dedupe_key=f"{RECLAIM_KEY}{job.attempts}",  # counted by /metrics as a lease reclaim
            )
            fleet.wake(session, settings, job.id)  # a live worker's, never the one that died
            counts["requeued"] += 1
    for job in repository.waiting_since_before(session, t - settings.stale_queued_seconds):
        if job.status == "validating_files":
            wake_validation(session, job.id)
        else:  # routed anew: the worker it went to may have died before taking it
            fleet.wake(session, settings, job.id)
        job.enqueued_at = t
        counts["rewoken"] += 1
    session.flush()
    return counts
