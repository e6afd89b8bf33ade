"""Budget caps (`max_tokens`, `max_wall_seconds`): a job that reaches one before its last step
checkpoints and pauses with a warn event naming the cap and the figures, and resumes only once the
cap is raised or removed (HTTP and the CLI)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.cli_client import main as cli
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint, Job, JobEvent, JobMetric
from tests.conftest import job_body, submit, upload
from tests.support import chaos
from workers import runner


def rows(settings: Settings, job_id: str) -> tuple[Job, list[JobMetric], list[JobEvent], list[int]]:
    with unit_of_work(settings) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        metrics = list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)))
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        ckpts = list(session.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job_id)))
        return job, metrics, events, ckpts


def test_a_tiny_job_pauses_at_its_max_tokens_cap_and_resumes_once_the_cap_is_removed(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    file_id = upload(live_client, live_auth, chaos.PROMPTS).json()["id"]
    body = chaos.job_body(file_id)
    body["method"]["reinforcement"]["hyperparameters"] = {**chaos.HYPER, "n_epochs": 3, "max_tokens": 1}
    job_id = submit(live_client, live_auth, live_settings, body)
    runner.run_job(job_id, live_settings)

    job, metrics, events, ckpts = rows(live_settings, job_id)
    assert job.status == "paused" and [m.step for m in metrics] == [1] and 1 in ckpts
    assert job.trained_tokens == metrics[0].data["trained_tokens"] > 1
    [cap] = [e for e in events if e.message.startswith("Budget cap")]
    assert cap.level == "warn" and "max_tokens 1 reached" in cap.message and "after step 1 of 3" in cap.message
    assert cap.data == {"cap": "max_tokens", "limit": 1, "used": job.trained_tokens, "step": 1}

    refused = live_client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=live_auth)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert "null to remove the cap" in refused.json()["error"]["message"]
    too_low = live_client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=live_auth, json={"max_tokens": 2})
    assert too_low.status_code == 400

    resumed = live_client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=live_auth, json={"max_tokens": None})
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert resumed.json()["hyperparameters"]["max_tokens"] is None
    runner.run_job(job_id, live_settings)
    job, metrics, _, _ = rows(live_settings, job_id)
    assert job.status == "succeeded" and [m.step for m in metrics] == [1, 2, 3]
    assert job.trained_tokens == sum(m.data["trained_tokens"] for m in metrics)


@pytest.fixture
def ticking(live_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The scripted trainer (tests/support/trainers.py): 8 steps of 0.25 s."""
    monkeypatch.setenv("RFT_TEST_STEPS", "8")
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "0.25")
    return live_settings.model_copy(update={"trainer": "tests.support.trainers:ticking"})


def wall_capped(file_id: str, seconds: int) -> dict[str, Any]:
    body = job_body(file_id)
    body["method"]["reinforcement"]["hyperparameters"] = {"max_wall_seconds": seconds}
    return body


def test_max_wall_seconds_pauses_the_job_and_the_cli_resumes_it_with_a_higher_cap(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    file_id = upload(live_client, live_auth, chaos.PROMPTS).json()["id"]
    job_id = submit(live_client, live_auth, ticking, wall_capped(file_id, 1))
    runner.run_job(job_id, ticking)
    job, metrics, events, _ = rows(ticking, job_id)
    assert job.status == "paused" and 3 <= len(metrics) < 8
    assert job.running_seconds >= 1
    [cap] = [e for e in events if e.message.startswith("Budget cap")]
    assert cap.data is not None and cap.data["cap"] == "max_wall_seconds" and cap.data["used"] >= 1

    key = live_auth["Authorization"].removeprefix("Bearer ")
    argv = ["jobs", "resume", job_id, "--base-url", "http://testserver", "--api-key", key]
    assert cli(argv, http=live_client) == 1
    assert "max_wall_seconds" in capsys.readouterr().err
    assert cli([*argv, "--max-wall-seconds", "3600"], http=live_client) == 0
    assert f"{job_id} queued" in capsys.readouterr().out
    runner.run_job(job_id, ticking)
    job, metrics, _, _ = rows(ticking, job_id)
    assert job.status == "succeeded" and len(metrics) == 8
    assert job.method["reinforcement"]["hyperparameters"]["max_wall_seconds"] == 3600


def test_a_cap_reached_at_the_last_step_lets_the_job_finish(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RFT_TEST_STEPS", "1")
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "1.1")
    file_id = upload(live_client, live_auth, chaos.PROMPTS).json()["id"]
    job_id = submit(live_client, live_auth, ticking, wall_capped(file_id, 1))
    runner.run_job(job_id, ticking)
    assert rows(ticking, job_id)[0].status == "succeeded"


@pytest.mark.parametrize(("cap", "value"), [("max_tokens", 0), ("max_wall_seconds", -5), ("max_tokens", "lots")])
def test_bad_caps_are_400_naming_the_field(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], cap: str, value: Any
) -> None:
    body = job_body(files[0])
    body["method"]["reinforcement"]["hyperparameters"] = {cap: value}
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"method.reinforcement.hyperparameters.{cap}"
