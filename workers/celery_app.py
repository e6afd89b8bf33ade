"""The Celery app. Importing it is cheap (no torch): the API uses it only to send wake-ups.

Two queues: `training` (one job per worker process, a fresh process per job) and `light`
(file validation, the lease reaper). Messages carry ids only, as JSON; the job row decides who
runs what, so a duplicated or lost message is harmless (the reaper re-sends lost ones).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from service.core.private import private_dir
from service.core.settings import Settings, get_settings
from workers import shutdown

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
            "workers.tasks.run_job": {"queue": TRAINING_QUEUE},
            "workers.tasks.validate_job": {"queue": LIGHT_QUEUE},
            "workers.tasks.reap_jobs": {"queue": LIGHT_QUEUE},
        },
        "beat_schedule": {
            "reap-jobs": {
                "task": "workers.tasks.reap_jobs",
                "schedule": settings.reaper_interval_seconds,
            }
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


app = make_celery()
app.conf.include = ["workers.tasks"]
# SIGTERM ends the running job's step, not the job: see workers/shutdown.py (the pool child's own
# handler is installed by the run_job task: billiard resets SIGTERM after worker_process_init).
signals.worker_shutting_down.connect(shutdown.forward_to_children, weak=False)
