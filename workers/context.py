"""What a trainer gets from the job runner: its config, and the only ways it writes job state.

Every write is its own short transaction keyed so that a step replayed after a resume cannot be
recorded twice (events by `dedupe_key`, metrics by step, checkpoints by step).
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from service.core.errors import FileValidationError
from service.core.settings import Settings
from service.core.storage import Storage, job_folder
from service.core.tables import Job
from service.files.repository import files_of_job
from service.jobs import budget, repository
from service.jobs.outcomes import checkpoint_created
from service.jobs.service import fine_tuned_model_name
from workers import shutdown
from workers.lease import Heartbeat
from workers.retry import in_transaction
from workers.throughput import record_throughput
from workers.tracking import Tracking

Control = Literal["cancel", "pause", "stop"]


class LeaseLost(Exception):
    """Another worker owns this job now (our heartbeat lapsed); stop without writing more."""


class RankLost(Exception):
    """Another process of this job (one job on several devices) died or fell silent; the job goes back
    to the queue and resumes from its last checkpoint, as after a lost worker."""


class StorageFull(Exception):
    """A checkpoint did not fit on the storage volume; the job pauses on its earlier checkpoints."""

    def __init__(self, step: int, folder: Path, free: int) -> None:
        super().__init__(
            f"Writing the checkpoint of step {step} failed: the storage volume is full (No space left on "
            f"device; {free} bytes free) at {folder}. The job is paused; its earlier checkpoints are intact. "
            f"Free space on the volume, then resume the job to continue from its latest checkpoint."
        )


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def disk_full(exc: BaseException, folder: Path) -> int | None:
    """The free bytes left on `folder`'s volume if `exc` was for want of space, else None.

    torch.save wraps the OSError in a RuntimeError that keeps neither its errno nor its text
    ("unexpected pos ..."), so besides the errno the volume itself is asked: a write that failed on
    a volume with (almost) nothing free is a full disk."""
    usage = shutil.disk_usage(folder)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return usage.free
        seen = seen.__cause__ or seen.__context__
    nearly_full = usage.free < max(1024 * 1024, usage.total // 100)
    return usage.free if nearly_full else None


@dataclass(frozen=True)
class TrainingResult:
    # "requeued": the worker is stopping; the trainer checkpointed and the job goes back to the queue.
    status: Literal["succeeded", "paused", "cancelled", "requeued"]
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    message: str = ""


@dataclass
class JobContext:
    job_id: str
    settings: Settings
    storage: Storage
    heartbeat: Heartbeat
    job: dict[str, Any] = field(default_factory=dict)  # the job row's columns, read at start
    local_keys: list[str] = field(default_factory=list)  # the job's files, copied to this host at start
    tracking: Tracking = field(init=False)  # the job's integrations (W&B, MLflow)
    _tick: float = field(init=False, default_factory=time.monotonic)  # running time counted up to here
    _last_step: tuple[int, Any] = field(init=False, default=(0, None))  # (step, total_steps) last recorded

    def __post_init__(self) -> None:
        def notify(level: str, message: str, data: dict[str, Any], key: str) -> None:
            self.event(message, level=level, data=data, dedupe_key=key)

        self.tracking = Tracking(self.job, self.settings, notify)

    @classmethod
    def load(cls, job_id: str, settings: Settings, storage: Storage, heartbeat: Heartbeat) -> JobContext:
        def read(session: Session) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
            row = repository.get_unscoped(session, job_id)
            assert row is not None
            snapshot = {c.key: getattr(row, c.key) for c in Job.__mapper__.column_attrs}
            return snapshot, {i: (f.storage_key, f.sha256) for i, f in files_of_job(session, row).items()}

        snapshot, keys = in_transaction(settings, read)
        for param in ("training_file", "validation_file"):
            if snapshot[param] and snapshot[param] not in keys:
                raise FileValidationError(
                    f"{param} {snapshot[param]} expired or was deleted before training could read it; "
                    "upload it again and create a new job.",
                    param=param,
                )
        # A local copy of each file (this host's cache when the bytes live in an object store).
        snapshot["training_path"] = storage.local_file(*keys[snapshot["training_file"]])
        if snapshot["validation_file"]:
            snapshot["validation_path"] = storage.local_file(*keys[snapshot["validation_file"]])
        used = [keys[snapshot["training_file"]][0]] + (
            [keys[snapshot["validation_file"]][0]] if snapshot["validation_file"] else []
        )
        return cls(job_id, settings, storage, heartbeat, snapshot, used)

    def _write(self, fn: Callable[[Any, Job], Any]) -> Any:
        if self.heartbeat.lost.is_set():
            raise LeaseLost(self.job_id)

        def checked(session: Session) -> Any:
            job = repository.get_unscoped(session, self.job_id)
            if job is None or job.worker_id != self.heartbeat.worker_id:
                raise LeaseLost(self.job_id)
            return fn(session, job)

        return in_transaction(self.settings, checked)

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, dedupe_key: str | None = None
    ) -> None:
        self._write(lambda s, job: repository.add_event(s, job, message, level=level, data=data, dedupe_key=dedupe_key))

    def metrics(self, step: int, data: dict[str, Any]) -> None:
        """Record one step's metrics and its `metrics` event once per step, count its trained tokens,
        then hand the step to the job's trackers and its timing to the throughput figures."""

        def write(session: Any, job: Job) -> bool:
            if not repository.record_metrics(session, job, step, data):
                return False
            repository.add_event(
                session,
                job,
                f"Step {step}/{data.get('total_steps', '?')}",
                type="metrics",
                data={"step": step, **data},
                dedupe_key=f"metrics:{step}",
            )
            if isinstance(data.get("trained_tokens"), int):
                job.trained_tokens = (job.trained_tokens or 0) + data["trained_tokens"]
            return True

        self._last_step = (step, data.get("total_steps"))
        if self._write(write):
            self.tracking.log(step, data)
            record_throughput(self.settings, self.job, data)

    def control(self) -> Control | None:
        """The pending request a trainer must honour after its current step, if any: the user's
        cancel or pause, a "pause" for a budget cap the job reached before its last step (with an
        event naming it: service/jobs/budget.py), else "stop" when this worker is shutting down
        (checkpoint, then return `TrainingResult("requeued")`). Counts the job's running time."""
        ran = self.untallied_seconds()

        def read(session: Any, job: Job) -> Control | None:
            job.running_seconds = (job.running_seconds or 0.0) + ran
            if job.cancel_requested or job.pause_requested:
                return "cancel" if job.cancel_requested else "pause"
            step, total = self._last_step
            over = budget.reached(job.method, job.running_seconds, job.trained_tokens)
            if over is None or step == total:
                return None
            repository.add_event(
                session,
                job,
                f"Budget cap {over.describe()} after step {step} of {total}. The job pauses with a checkpoint; "
                f'resume it with a higher {over.cap} or none (a resume body such as {{"{over.cap}": null}}).',
                level="warn",
                data={**over.data(), "step": step},
                dedupe_key=f"budget:{over.cap}:{job.attempts}",
            )
            return "pause"

        result: Control | None = self._write(read)
        return result or ("stop" if shutdown.requested() else None)

    def untallied_seconds(self) -> float:
        """Seconds run since the last count of the job's running time (and restart the count)."""
        now = time.monotonic()
        ran, self._tick = now - self._tick, now
        return ran

    def update_job(self, **values: Any) -> None:
        """Progress fields such as `estimated_finish`, or the `method` with its resolved hyperparameters
        (which the job's trackers log as their configuration)."""

        def write(_: Any, job: Job) -> None:
            for name, value in values.items():
                setattr(job, name, value)

        self._write(write)
        if "method" in values:
            self.job["method"] = values["method"]
            self.tracking.config(values["method"].get("reinforcement", {}).get("hyperparameters", {}))

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        """Write a checkpoint folder via `write(staging_dir)`, fsync and rename it, then record it.

        The database row is the commit point: a crash before it leaves an unreferenced folder that
        the next save of the same step replaces.
        """
        key = f"{job_folder(self.job['project_id'], self.job_id)}/step-{step:06d}"
        existing = self._write(lambda session, job: repository.checkpoint_at(session, job.id, step))
        if existing is None:  # a recorded folder is never rewritten: a crash then would leave half of it
            staging = self.storage.staging_dir(key)
            try:
                write(staging)
                self.storage.commit_dir(staging, key)
            except Exception as exc:
                free = disk_full(exc, staging.parent)
                shutil.rmtree(staging, ignore_errors=True)  # what a full disk needs back first
                if free is not None:
                    raise StorageFull(step, staging.parent, free) from exc
                raise

        def record(session: Any, job: Job) -> str:
            name = f"{fine_tuned_model_name(job)}:ckpt-step-{step}"
            new = repository.checkpoint_at(session, job.id, step) is None
            checkpoint_id = repository.record_checkpoint(session, job, step, name, key, metrics)
            if new:  # a step's checkpoint saved again (a pause after an eval step) is not a new one
                checkpoint_created(session, job, checkpoint_id, step, name)
            return checkpoint_id

        checkpoint_id: str = self._write(record)
        return checkpoint_id

    def drop_local_copies(self) -> None:
        """Forget this host's copies of the job's files and checkpoints once it ends here: the store
        keeps them, and a tenant's deleted data must not linger in a worker's cache."""
        for key in self.local_keys:
            self.storage.drop_local(key)
        self.storage.drop_local(job_folder(self.job["project_id"], self.job_id))

    def prune_checkpoints(self, keep_steps: set[int]) -> None:
        """Delete the job's checkpoints (rows, then files) whose step is not in `keep_steps`."""

        def drop(session: Any, job: Job) -> list[str]:
            return repository.delete_checkpoints_except(session, job.id, keep_steps)

        for key in self._write(drop):  # the rows are gone (committed) before the files go
            self.storage.delete(key)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        rows = in_transaction(self.settings, lambda session: repository.checkpoints_of(session, self.job_id))
        if not rows:
            return None
        return rows[-1].step_number, self.storage.local_dir(rows[-1].storage_key)
