"""The worker's Celery app: `service.core.queue`'s configuration, the tasks, and the shutdown signal.
Importing it is cheap (no torch)."""

from __future__ import annotations

from celery import signals

from service.core.queue import LIGHT_QUEUE, TRAINING_QUEUE, celery_config, make_celery
from workers import shutdown

__all__ = ["LIGHT_QUEUE", "TRAINING_QUEUE", "app", "celery_config"]

app = make_celery()
app.conf.include = ["workers.tasks"]
# SIGTERM ends the running job's step, not the job: see workers/shutdown.py (the pool child's own
# handler is installed by the run_job task: billiard resets SIGTERM after worker_process_init).
signals.worker_shutting_down.connect(shutdown.forward_to_children, weak=False)
