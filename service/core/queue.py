"""Sending wake-up messages. The API sends by task name, so it never imports worker code."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.core.db import enqueue_after_commit

VALIDATE_JOB = "workers.tasks.validate_job"
RUN_JOB = "workers.tasks.run_job"


def send_task(task_name: str, args: list[Any], queue: str) -> None:
    from workers.celery_app import app

    app.send_task(task_name, args=args, queue=queue)


def wake_validation(session: Session, job_id: str) -> None:
    enqueue_after_commit(session, VALIDATE_JOB, [job_id], "light")


def wake_training(session: Session, job_id: str) -> None:
    enqueue_after_commit(session, RUN_JOB, [job_id], "training")
