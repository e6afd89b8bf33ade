"""SQLAlchemy models: the schema changes only through Alembic migrations in `migrations/`.

Every table has an integer `seq` primary key that orders rows for cursor pagination and a public
string `id` (OpenAI-style prefixes). Tenant-owned rows carry `project_id`, so one function
(`service.auth.service.readable`) scopes every query. Times are unix seconds, as the API shows them.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text)
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # OpenAI's `expires_after`: the file expirer (workers/expiry.py) deletes the row and bytes after this.
    expires_at: Mapped[int | None] = mapped_column(BigInteger, index=True)


JOB_TERMINAL = ("succeeded", "failed", "cancelled")  # a job in one of these statuses never runs again


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_idempotency_key"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default="validating_files")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    # Control flags the running job polls: cancel and pause are requests, never a kill.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The lease: whoever holds a live lease runs the job; the broker message only wakes workers.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # What a worker must have to run it (service/fleet/service.py routes on these): the memory of the
    # job's smallest plan on one device (None where the API could not plan it), and the engine asked for.
    needs_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    needs_engine: Mapped[str | None] = mapped_column(String(16))
    # Seconds the job has run on workers, over all its attempts (what `max_wall_seconds` caps).
    running_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Set for events a trainer may emit twice after a resume (e.g. "metrics:step:12"): unique.
    dedupe_key: Mapped[str | None] = mapped_column(String(128))
    __table_args__ = (UniqueConstraint("job_id", "dedupe_key", name="uq_job_events_dedupe"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_step"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number", name="uq_checkpoints_step"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(512))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class CheckpointPermission(Base):
    """A checkpoint shared with another project (OpenAI's `checkpoint.permission`). The row belongs to
    the checkpoint's owner (`project_id`); `granted_project_id` may read the checkpoint
    (`service.auth.service.readable(..., shared=True)`) until the row goes."""

    __tablename__ = "checkpoint_permissions"
    __table_args__ = (UniqueConstraint("checkpoint_id", "granted_project_id", name="uq_checkpoint_permissions_grant"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    granted_project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Worker(Base):
    """A training or light worker as it reports itself in its heartbeat (service/fleet)."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid of its main process
    hostname: Mapped[str] = mapped_column(String(256))
    queues: Mapped[list[str]] = mapped_column(JSON)
    device_type: Mapped[str] = mapped_column(String(16))  # "cuda" or "cpu"
    device_count: Mapped[int] = mapped_column(Integer)
    device_memory_bytes: Mapped[int] = mapped_column(BigInteger)  # one device's (host memory on CPU)
    engines: Mapped[list[str]] = mapped_column(JSON)
    current_job_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    # What throughput figures are kept by (`Throughput.device`), and the experiment trackers whose
    # client packages it has ("wandb", "mlflow"); None: a worker of a version that did not report them.
    device_name: Mapped[str | None] = mapped_column(String(128))
    trackers: Mapped[list[str] | None] = mapped_column(JSON)


class Throughput(Base):
    """How fast a model trains on one kind of device, a rolling figure the workers update after every
    training step (`service/fleet/throughput.py`); what the pre-flight estimate divides by."""

    __tablename__ = "throughput"
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    device: Mapped[str] = mapped_column(String(128), primary_key=True)  # `Worker.device_name`
    mode: Mapped[str] = mapped_column(String(8), primary_key=True)  # "full" or "lora"
    steps: Mapped[int] = mapped_column(Integer)  # how many steps the figure has seen
    seconds_per_sequence: Mapped[float] = mapped_column(Float)  # a training step's, per sampled sequence
    eval_seconds_per_sequence: Mapped[float | None] = mapped_column(Float)
    max_completion_tokens: Mapped[int] = mapped_column(Integer)  # of the jobs measured (the latest's)
    tokens_per_second: Mapped[float] = mapped_column(Float)  # completion tokens a second, as the loop reports
    updated_at: Mapped[float] = mapped_column(Float)


class WebhookEndpoint(Base):
    """Where a project's job events go (service/webhooks); the signing secret is kept to sign with."""

    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))
    # After a rotation that keeps the old secret for a while, deliveries carry both signatures.
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction that made the event happen,
    and sent by the light workers after that commit until a 2xx or the last attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # the exact JSON that is signed and sent
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; while an attempt is under way, when its claim lapses.
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float)


class WebhookAttempt(Base):
    """One POST of a delivery, as the project's delivery log shows it."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_attempt"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    attempted_at: Mapped[float] = mapped_column(Float)
