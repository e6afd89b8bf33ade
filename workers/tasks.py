"""Celery tasks: thin wrappers that take ids, re-read state and are safe to deliver twice."""

from __future__ import annotations

from service.core.db import unit_of_work
from service.core.settings import get_settings
from service.core.storage import storage_for
from service.files import service as files
from workers import lease, runner, shutdown, validate, webhooks
from workers.celery_app import app


@app.task(name="workers.tasks.validate_job")
def validate_job(job_id: str) -> None:
    validate.validate_job(job_id, get_settings())


@app.task(name="workers.tasks.run_job")
def run_job(job_id: str) -> None:
    shutdown.install_handler()  # in the pool child, which runs one job and exits
    runner.run_job(job_id, get_settings())


@app.task(name="workers.tasks.deliver_webhook")
def deliver_webhook(delivery_id: str) -> None:
    webhooks.deliver(delivery_id, get_settings())


@app.task(name="workers.tasks.expire_files")
def expire_files() -> int:
    settings = get_settings()
    with unit_of_work(settings) as session:
        return files.expire(session, storage_for(settings))


@app.task(name="workers.tasks.reap_jobs")
def reap_jobs() -> dict[str, int]:
    settings = get_settings()
    with unit_of_work(settings) as session:
        counts = lease.reap(session, settings)
        counts["webhooks_rewoken"] = webhooks.rewake_overdue(session, settings)
        return counts
