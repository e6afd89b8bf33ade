"""The fleet: which live workers can run a job, and which queue its wake-up goes to.

Each worker reports itself every heartbeat (workers/fleet.py): its device type and count, one
device's memory, its engines and its queues; a training worker also listens on a queue of its own.
A job records at creation what it needs of one device (its smallest memory plan, and vLLM where it
asked for it). Its wake-up goes to the own queue of a live worker that has that, the idle ones
first and among those the one with the least memory that fits (the big ones stay free for the jobs
only they can run), and one that offers the `n_devices` the job asked for; where no worker reports
itself (the embedded `rft serve`, workers of older versions) it goes to the shared `training` queue
as before. A job that no live worker could ever
run is refused at creation, saying what it needs and what the fleet has.
"""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy.orm import Session

from service.core.errors import InvalidRequest
from service.core.queue import TRAINING_QUEUE, wake_training
from service.core.settings import Settings
from service.core.tables import Job, Worker
from service.fleet import repository
from service.jobs.repository import get_unscoped
from service.models.memory_plan import HEADROOM

LIVE_HEARTBEATS = 3  # a worker is live while its last report is younger than this many intervals


def own_queue(worker_id: str) -> str:
    """The queue only this training worker listens on (besides the shared one)."""
    return f"{TRAINING_QUEUE}.{re.sub(r'[^A-Za-z0-9_.-]', '-', worker_id)}"


def live_training_workers(session: Session, settings: Settings) -> list[Worker]:
    since = time.time() - LIVE_HEARTBEATS * settings.heartbeat_seconds
    return [w for w in repository.live(session, since) if TRAINING_QUEUE in w.queues]


def can_run(worker: Worker, memory_bytes: int | None, engine: str | None, devices: int | None = None) -> bool:
    fits = memory_bytes is None or memory_bytes <= HEADROOM * worker.device_memory_bytes
    enough = devices is None or devices <= worker.device_count
    return fits and enough and (engine in (None, "auto", "torch") or engine in worker.engines)


def devices_asked(method: dict[str, Any] | None) -> int | None:
    """The devices a job asked for (its `n_devices`), or None for `auto` (what the worker has)."""
    asked = ((method or {}).get("reinforcement") or {}).get("hyperparameters", {}).get("n_devices", "auto")
    return None if asked == "auto" else int(asked)


def describe(worker: Worker) -> str:
    busy = f", running {worker.current_job_id}" if worker.current_job_id else ""
    memory = worker.device_memory_bytes / 1024**3
    return (
        f"{worker.id} ({worker.device_type} x{worker.device_count}, {memory:.1f} GiB each, "
        f"engines {'+'.join(worker.engines)}{busy})"
    )


def refuse_if_no_worker_can_run(
    fleet: list[Worker], memory_bytes: int | None, engine: str | None, plan: str, devices: int | None = None
) -> None:
    """A 400 where training workers report themselves (`fleet`, the live ones) and none could run this job."""
    if not fleet or any(can_run(w, memory_bytes, engine, devices) for w in fleet):
        return
    needs = [f"{memory_bytes / 1024**3:.1f} GiB on each device ({plan})" if memory_bytes else ""]
    needs += [f"{devices} devices"] if devices else []
    needs += [f"the {engine} rollout engine"] if engine not in (None, "auto", "torch") else []
    raise InvalidRequest(
        f"No live training worker can run this job: it needs {' and '.join(n for n in needs if n)}, and the "
        f"fleet has {'; '.join(describe(w) for w in fleet)}. Add a worker that has it, or make the job "
        "smaller (LoRA, a smaller model, shorter completions).",
        param="model",
        code="job_too_large",
    )


def route(session: Session, settings: Settings, job: Job) -> str:
    """The queue a job's wake-up goes to."""
    devices = devices_asked(job.method)
    live = live_training_workers(session, settings)
    fits = [w for w in live if can_run(w, job.needs_memory_bytes, job.needs_engine, devices)]
    if not fits:
        return TRAINING_QUEUE
    best = min(fits, key=lambda w: (w.current_job_id is not None, w.device_memory_bytes, w.id))
    return own_queue(best.id)


def wake(session: Session, settings: Settings, job_id: str) -> None:
    """`wake_training`, to the queue of a worker that can run the job."""
    job = get_unscoped(session, job_id)
    wake_training(session, job_id, route(session, settings, job) if job is not None else TRAINING_QUEUE)
