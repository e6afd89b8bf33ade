"""What an operator watches: Prometheus metrics at `/metrics` and logs that carry request and job ids.

- Every HTTP request gets an id (the caller's `X-Request-ID` where it is a sane token, else a new
  one), returned in the `x-request-id` header as OpenAI's API does and put on every log line the
  request causes; a worker puts the job's id on the lines of the job it runs.
- `RFT_LOG_FORMAT=json` writes one JSON object per log line (`ts`, `level`, `logger`, `message`,
  `request_id`, `job_id`, `exc`), for log shippers; `text` (the default) stays human.
- `/metrics` (Prometheus text format; `Authorization: Bearer $RFT_ADMIN_KEY`, off while that is
  unset, since its per-job series name every tenant's jobs): API latency histograms by method, route
  template and status, measured in this process, and, read from the database at each scrape so every
  API process answers alike: jobs by status, queue depth, each running job's last step time,
  tokens/s and grader error rate, and lease reclaims (jobs a lost worker gave back).
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.settings import Settings
from service.core.tables import Job, JobEvent, JobMetric

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("rft_request_id", default=None)
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("rft_job_id", default=None)
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RECLAIM_KEY = "lease_reclaim:"  # the dedupe_key prefix of the event the reaper writes when it requeues a lost job
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
            "job_id": JOB_ID.get(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class IdsFilter(logging.Filter):
    """Text logs carry the ids too, as ` [request=... job=...]` where they are set."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = [f"{name}={value}" for name, value in (("request", REQUEST_ID.get()), ("job", JOB_ID.get())) if value]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return True


def configure_logging(settings: Settings) -> None:
    """The root logger's one handler, in `RFT_LOG_FORMAT` (called by `rft serve` and the workers)."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.addFilter(IdsFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "rft", False)]:
        root.removeHandler(old)
    handler.rft = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class DatabaseCollector(Collector):
    """The fleet's state, read from the database at each scrape."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        with self.sessions() as session:
            yield from self._jobs(session)
            yield from self._running(session)
            reclaimed_events = select(func.count(JobEvent.seq)).where(JobEvent.dedupe_key.startswith(RECLAIM_KEY))
            reclaims = session.scalar(reclaimed_events)
        reclaimed = CounterMetricFamily(
            "rft_lease_reclaims", "Jobs requeued because their worker stopped renewing the lease"
        )
        reclaimed.add_metric([], float(reclaims or 0))
        yield reclaimed

    def _jobs(self, session: Session) -> Iterator[Any]:
        by_status = GaugeMetricFamily("rft_jobs", "Fine-tuning jobs by status", labels=["status"])
        counts = dict(session.execute(select(Job.status, func.count(Job.seq)).group_by(Job.status)).all())
        for status in ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"):
            by_status.add_metric([status], float(counts.get(status, 0)))
        yield by_status
        depth = GaugeMetricFamily("rft_queue_depth", "Jobs waiting for a worker, by queue", labels=["queue"])
        depth.add_metric(["training"], float(counts.get("queued", 0)))
        depth.add_metric(["light"], float(counts.get("validating_files", 0)))
        yield depth

    def _running(self, session: Session) -> Iterator[Any]:
        labels = ["job_id", "project_id"]
        step = GaugeMetricFamily("rft_job_step_seconds", "A running job's last training step, wall time", labels=labels)
        speed = GaugeMetricFamily(
            "rft_job_tokens_per_second", "A running job's last step's completion tokens/s", labels=labels
        )
        errors = GaugeMetricFamily(
            "rft_job_grader_error_rate",
            "Share of a running job's last step's samples with this grader error",
            labels=[*labels, "error"],
        )
        last = (
            select(JobMetric.job_id, func.max(JobMetric.step).label("step"))
            .join(Job, Job.id == JobMetric.job_id)
            .where(Job.status == "running")
            .group_by(JobMetric.job_id)
            .subquery()
        )
        rows = session.execute(
            select(Job.id, Job.project_id, JobMetric.data)
            .join(last, last.c.job_id == Job.id)
            .join(JobMetric, (JobMetric.job_id == last.c.job_id) & (JobMetric.step == last.c.step))
        ).all()
        for job_id, project_id, data in rows:
            data = data or {}
            timing = (data.get("timing") or {}).get("step") or {}
            if isinstance(timing.get("full_iteration"), int | float):
                step.add_metric([job_id, project_id], float(timing["full_iteration"]))
            if isinstance(data.get("tokens_per_second"), int | float):
                speed.add_metric([job_id, project_id], float(data["tokens_per_second"]))
            for key, value in data.items():  # `<flag>_mean`, OpenAI's per-error-type rates
                if key.endswith("_error_mean") and isinstance(value, int | float):
                    errors.add_metric([job_id, project_id, key.removesuffix("_mean")], float(value))
        yield step
        yield speed
        yield errors


class Observability:
    """An app's registry: its latency histogram and the database collector."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "rft_api_request_seconds",
            "API request latency, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.registry.register(DatabaseCollector(sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def admin_allowed(settings: Settings, authorization: str | None) -> bool:
    """Whether `authorization` carries `RFT_ADMIN_KEY` (never, while that is unset)."""
    expected = settings.admin_key
    if not expected or not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), expected.encode())


class RequestObserver:
    """ASGI middleware: the request id (context and `x-request-id` header) and the latency histogram."""

    def __init__(self, app: ASGIApp, observability: Observability) -> None:
        self.app, self.observability = app, observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"), "")
        request_id = given if SANE_ID.match(given) else f"req_{secrets.token_hex(16)}"
        token = REQUEST_ID.set(request_id)
        status = 500
        began = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # templates, never raw paths
            self.observability.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - began)
            REQUEST_ID.reset(token)
