"""What an operator sees: `/metrics` behind the admin key (attacked with no key, a project's key and
a wrong key), its series read from the database, request ids on responses and log lines, job ids
on a worker's log lines, and JSON logs."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.observability import JOB_ID, REQUEST_ID, JsonFormatter
from service.core.settings import Settings
from service.core.tables import Job, JobMetric
from tests.conftest import job_body
from workers import lease, runner

ADMIN = "operator-only-token-0123456789abcdef"


@pytest.fixture
def admin(settings: Settings) -> dict[str, str]:
    settings.admin_key = ADMIN
    return {"Authorization": f"Bearer {ADMIN}"}


def scrape(client: TestClient, admin: dict[str, str]) -> str:
    response = client.get("/metrics", headers=admin)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def value(text: str, series: str) -> float:
    """The sample of `series` (name and labels exactly as exposed)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the scrape")


def test_metrics_are_off_until_an_admin_key_is_set(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/metrics", headers=auth)
    assert response.status_code == 404
    assert "RFT_ADMIN_KEY" in response.json()["error"]["message"]


def test_metrics_refuse_anyone_without_the_admin_key(
    client: TestClient, auth: dict[str, str], admin: dict[str, str]
) -> None:
    """A tenant must not read the fleet's series (they name every project's jobs)."""
    for headers in ({}, auth, {"Authorization": f"Bearer {ADMIN[:-1]}"}, {"Authorization": ADMIN}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert "rft_jobs" not in response.text
    assert client.get("/metrics", headers=admin).status_code == 200


def test_metrics_report_jobs_queues_running_steps_latency_and_reclaims(
    client: TestClient,
    auth: dict[str, str],
    admin: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    settings: Settings,
) -> None:
    ids = [client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0])).json()["id"] for _ in range(3)]
    client.get(f"/v1/fine_tuning/jobs/{ids[0]}", headers=auth)
    jobs = {j.id: j for j in db_session.scalars(select(Job).where(Job.id.in_(ids)))}
    running, lapsed, waiting = (jobs[i] for i in ids)
    running.status, running.worker_id, running.lease_expires_at = "running", "w1", time.time() + 60
    waiting.status = "queued"
    db_session.add(
        JobMetric(
            project_id=running.project_id,
            job_id=running.id,
            step=3,
            data={"timing": {"step": {"full_iteration": 2.5}}, "tokens_per_second": 40.0, "other_error_mean": 0.25},
        )
    )
    db_session.add(JobMetric(project_id=running.project_id, job_id=running.id, step=2, data={"tokens_per_second": 1}))
    # a worker that died: its lease lapsed, and the reaper hands the job back
    lapsed.status, lapsed.worker_id, lapsed.lease_expires_at, lapsed.attempts = "running", "dead", time.time() - 5, 1
    db_session.flush()
    assert lease.reap(db_session, settings)["requeued"] == 1
    db_session.flush()

    text = scrape(client, admin)
    labels = f'job_id="{running.id}",project_id="{running.project_id}"'
    assert value(text, 'rft_jobs{status="running"}') == 1
    assert value(text, 'rft_jobs{status="queued"}') == 2  # the waiting one and the reclaimed one
    assert value(text, 'rft_queue_depth{queue="training"}') == 2
    assert value(text, f"rft_job_step_seconds{{{labels}}}") == 2.5  # the last step's, not step 2's
    assert value(text, f"rft_job_tokens_per_second{{{labels}}}") == 40.0
    assert value(text, f'rft_job_grader_error_rate{{error="other_error",{labels}}}') == 0.25  # labels sorted
    assert value(text, "rft_lease_reclaims_total") == 1
    # latency by route template, never by raw path (a job id per series would grow without bound)
    route = 'method="GET",route="/v1/fine_tuning/jobs/{job_id}",status="200"'
    assert value(text, f"rft_api_request_seconds_count{{{route}}}") >= 1
    assert ids[0] not in "\n".join(line for line in text.splitlines() if "rft_api_request" in line)


def test_every_response_carries_a_request_id_and_a_callers_sane_one_is_kept(
    client: TestClient, auth: dict[str, str]
) -> None:
    first, second = (client.get("/v1/files", headers=auth).headers["x-request-id"] for _ in range(2))
    assert first.startswith("req_") and first != second
    kept = client.get("/v1/files", headers={**auth, "X-Request-ID": "trace-42.a"})
    assert kept.headers["x-request-id"] == "trace-42.a"
    for insane in ("a b", "x" * 200, "id\u00e9"):
        headers = [(k.encode(), v.encode()) for k, v in auth.items()] + [(b"X-Request-ID", insane.encode())]
        replaced = client.get("/v1/files", headers=headers)
        assert replaced.headers["x-request-id"].startswith("req_")
    assert client.get("/nowhere").headers["x-request-id"].startswith("req_")  # errors too


class Keep(logging.Handler):
    """Formats each record as it is emitted (the ids live in the emitting context)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.formatter_ = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.formatter_.format(record)))


def test_json_log_lines_carry_the_request_and_the_job_id(settings: Settings) -> None:
    keep, workers_log = Keep(), logging.getLogger("workers")
    level = workers_log.level
    workers_log.addHandler(keep)
    workers_log.setLevel(logging.INFO)
    try:
        token = REQUEST_ID.set("req_abc")
        logging.getLogger("workers.test").warning("inside a request")
        REQUEST_ID.reset(token)
        runner.run_job("ftjob-nobody", settings)  # not queued: the runner says so, under the job's id
    finally:
        workers_log.removeHandler(keep)
        workers_log.setLevel(level)
    assert keep.lines[0]["request_id"] == "req_abc" and keep.lines[0]["message"] == "inside a request"
    said = next(line for line in keep.lines if "ftjob-nobody" in line["message"])
    assert said["job_id"] == "ftjob-nobody" and said["level"] == "info" and said["logger"] == "workers.runner"
    assert JOB_ID.get() is None  # reset when the job is done
