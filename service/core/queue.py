"""The work queue: the Celery configuration, and the wake-up messages sent after a commit.

The API and the workers both send by task name, so nothing here imports worker code; the worker
process builds its Celery app from `celery_config` too (`workers/celery_app.py`) and adds the tasks.
Messages carry ids only, as JSON; the job row decides who runs what, so a duplicated or lost message
is harmless (the reaper re-sends lost ones). Two queues: `training` (one job per worker process, a
fresh process per job) and `light` (file validation, webhook deliveries, the lease reaper, the file expirer).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from service.core.db import on_commit
from service.core.private import private_dir
from service.core.settings import Settings, get_settings

VALIDATE_JOB = "workers.tasks.validate_job"
RUN_JOB = "workers.tasks.run_job"
REAP_JOBS = "workers.tasks.reap_jobs"
DELIVER_WEBHOOK = "workers.tasks.deliver_webhook"
EXPIRE_FILES = "workers.tasks.expire_files"
# (task name, args, queue, countdown): countdown is the seconds to hold the message before running it.
TaskSender = Callable[[str, list[Any], str, float | None], None]

TRAINING_QUEUE = "training"
LIGHT_QUEUE = "light"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": LIGHT_QUEUE,
        "task_routes": {
            RUN_JOB: {"queue": TRAINING_QUEUE},
            VALIDATE_JOB: {"queue": LIGHT_QUEUE},
            REAP_JOBS: {"queue": LIGHT_QUEUE},
            DELIVER_WEBHOOK: {"queue": LIGHT_QUEUE},
            EXPIRE_FILES: {"queue": LIGHT_QUEUE},
        },
        "beat_schedule": {
            "reap-jobs": {
                "task": REAP_JOBS,
                "schedule": settings.reaper_interval_seconds,
            },
            "expire-files": {
                "task": EXPIRE_FILES,
                "schedule": settings.file_expiry_interval_seconds,
            },
        },
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if settings.uses_filesystem_broker:
        folder = settings.broker_dir
        # Messages name job ids and are written by kombu under the process umask: the folders keep
        # other local users out whatever that umask is.
        for sub in ("queue", "control", "processed"):
            private_dir(folder / sub)
        private_dir(folder)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "polling_interval": 0.2,
        }
        # Remote control needs reply queues nobody would drain on the filesystem transport.
        config["worker_enable_remote_control"] = False
    return config


def make_celery(settings: Settings | None = None) -> Celery:
    app = Celery("rft")
    app.conf.update(celery_config(settings or get_settings()))
    return app


@lru_cache(maxsize=1)
def _sending_app() -> Celery:
    return make_celery()


def send_task(task_name: str, args: list[Any], queue: str, countdown: float | None = None) -> None:
    _sending_app().send_task(task_name, args=args, queue=queue, countdown=countdown)


_sender: TaskSender | None = None


def set_task_sender(sender: TaskSender | None) -> None:
    """Send wake-ups through `sender` instead of the broker (tests record them); None restores it."""
    global _sender
    _sender = sender


def enqueue_after_commit(
    session: Session, task_name: str, args: list[Any], queue: str, countdown: float | None = None
) -> None:
    """Send the task once the session's transaction commits (to run `countdown` seconds later where
    given); nothing on rollback."""
    on_commit(session, lambda: (_sender or send_task)(task_name, args, queue, countdown))


def wake_validation(session: Session, job_id: str) -> None:
    enqueue_after_commit(session, VALIDATE_JOB, [job_id], LIGHT_QUEUE)


def wake_training(session: Session, job_id: str, queue: str = TRAINING_QUEUE) -> None:
    """Wake a training worker for the job: `queue` is the shared one, or a worker's own
    (service/fleet/service.py picks it)."""
    enqueue_after_commit(session, RUN_JOB, [job_id], queue)


def wake_webhook(session: Session, delivery_id: str, countdown: float | None = None) -> None:
    """Wake a light worker to attempt the webhook delivery (after `countdown` seconds: a retry's backoff)."""
    enqueue_after_commit(session, DELIVER_WEBHOOK, [delivery_id], LIGHT_QUEUE, countdown)
