"""The worker side against a real PostgreSQL: file validation, claims, the runner, and the reaper."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Job, JobEvent, JobMetric
from tests.conftest import GOOD_LINES, job_body, jsonl, set_job_flags, upload
from workers import lease, runner, validate


def make_job(client: TestClient, auth: dict[str, str], train: bytes, valid: bytes | None = None) -> str:
    train_id = upload(client, auth, train).json()["id"]
    valid_id = upload(client, auth, valid, "valid.jsonl").json()["id"] if valid is not None else None
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(train_id, valid_id))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def job_row(settings: Settings, job_id: str) -> Job:
    with unit_of_work(settings) as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def messages(settings: Settings, job_id: str) -> list[str]:
    with unit_of_work(settings) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
        return [f"{e.level}: {e.message}" for e in rows]


def queued_job(client: TestClient, auth: dict[str, str], settings: Settings) -> str:
    job_id = make_job(client, auth, jsonl(GOOD_LINES[:4]), jsonl(GOOD_LINES[4:]))
    validate.validate_job(job_id, settings)
    assert job_row(settings, job_id).status == "queued"
    return job_id


def test_valid_files_queue_the_job_and_wake_training(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, sent_tasks: list[Any]
) -> None:
    job_id = queued_job(live_client, live_auth, live_settings)
    assert sent_tasks[-1] == ("workers.tasks.run_job", [job_id], "training")
    assert any("4 examples" in m for m in messages(live_settings, job_id))
    assert job_row(live_settings, job_id).worker_id is None


def test_bad_training_file_fails_the_job_naming_file_and_lines(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, sent_tasks: list[Any]
) -> None:
    lines = jsonl(GOOD_LINES[:2]) + b"{not json\n" + jsonl([{"messages": [{"role": "assistant", "content": "x"}]}])
    job_id = make_job(live_client, live_auth, lines)
    validate.validate_job(job_id, live_settings)
    job = job_row(live_settings, job_id)
    assert job.status == "failed"
    assert job.error is not None
    assert job.error["param"] == "training_file"
    assert job.error["code"] == "invalid_training_file"
    assert "line 3: is not valid JSON" in job.error["message"]
    assert "line 4: the last message must have role 'user'" in job.error["message"]
    assert all(name != "workers.tasks.run_job" for name, _, _ in sent_tasks)
    api_job = live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).json()
    assert api_job["error"]["param"] == "training_file"


def test_identical_train_and_validation_content_fails_on_validation_file(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = make_job(live_client, live_auth, jsonl(GOOD_LINES), jsonl(GOOD_LINES))
    validate.validate_job(job_id, live_settings)
    job = job_row(live_settings, job_id)
    assert job.status == "failed"
    assert job.error is not None and job.error["param"] == "validation_file"
    assert "same content" in job.error["message"]


def test_overlapping_examples_are_a_warning_with_line_numbers(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = make_job(live_client, live_auth, jsonl(GOOD_LINES[:4]), jsonl([GOOD_LINES[4], GOOD_LINES[1]]))
    validate.validate_job(job_id, live_settings)
    assert job_row(live_settings, job_id).status == "queued"
    warnings = [m for m in messages(live_settings, job_id) if m.startswith("warn:")]
    assert len(warnings) == 1 and "1 of 2 validation examples" in warnings[0] and "lines 2" in warnings[0]


def test_file_deleted_before_validation_fails_clearly(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = make_job(live_client, live_auth, jsonl(GOOD_LINES))
    live_client.delete(f"/v1/files/{job_row(live_settings, job_id).training_file}", headers=live_auth)
    validate.validate_job(job_id, live_settings)
    job = job_row(live_settings, job_id)
    assert job.status == "failed" and job.error is not None and "deleted" in job.error["message"]


def test_validation_delivered_twice_runs_once(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, sent_tasks: list[Any]
) -> None:
    job_id = queued_job(live_client, live_auth, live_settings)
    validate.validate_job(job_id, live_settings)
    assert [t for t in sent_tasks if t[0] == "workers.tasks.run_job"] == [
        ("workers.tasks.run_job", [job_id], "training")
    ]


def test_only_one_of_two_claims_wins(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = queued_job(live_client, live_auth, live_settings)
    with unit_of_work(live_settings) as session:
        assert lease.claim(session, job_id, "a", live_settings, "queued", "running")
    with unit_of_work(live_settings) as session:
        assert not lease.claim(session, job_id, "b", live_settings, "queued", "running")
    job = job_row(live_settings, job_id)
    assert (job.status, job.worker_id, job.attempts) == ("running", "a", 1)


def test_unknown_model_is_rejected_at_creation(live_client: TestClient, live_auth: dict[str, str]) -> None:
    train_id = upload(live_client, live_auth, jsonl(GOOD_LINES)).json()["id"]
    response = live_client.post(
        "/v1/fine_tuning/jobs", headers=live_auth, json={**job_body(train_id), "model": "gpt-9"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert "tiny-random-llama" in response.json()["error"]["message"]


def test_crashing_trainer_fails_the_job_with_the_exception(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    live_settings.trainer = "tests.support.trainers:crashing"
    job_id = queued_job(live_client, live_auth, live_settings)
    runner.run_job(job_id, live_settings)
    job = job_row(live_settings, job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "internal_error" and "boom in step 1" in job.error["message"]


@pytest.fixture
def ticking(live_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    live_settings.trainer = "tests.support.trainers:ticking"
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "0")
    return live_settings


def test_runner_records_metrics_checkpoints_and_the_final_model(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    job_id = queued_job(live_client, live_auth, ticking)
    runner.run_job(job_id, ticking)
    job = live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).json()
    assert job["status"] == "succeeded"
    assert job["fine_tuned_model"].startswith("ft:tiny-random-llama:")
    assert job["trained_tokens"] == 600
    ckpts = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=live_auth).json()["data"]
    assert [c["step_number"] for c in ckpts] == [6, 4, 2]
    assert ckpts[0]["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-6"
    events = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=live_auth, params={"limit": 100}).json()[
        "data"
    ]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == [6, 5, 4, 3, 2, 1]


def test_pause_checkpoints_and_resume_continues_without_duplicate_steps(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings, sent_tasks: list[Any]
) -> None:
    job_id = queued_job(live_client, live_auth, ticking)
    set_job_flags(ticking, job_id, pause_requested=True)
    runner.run_job(job_id, ticking)
    paused = job_row(ticking, job_id)
    assert paused.status == "paused" and paused.finished_at is None
    ckpts = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=live_auth).json()["data"]
    assert [c["step_number"] for c in ckpts] == [1]
    assert live_client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=live_auth).json()["status"] == "queued"
    runner.run_job(job_id, ticking)
    assert job_row(ticking, job_id).status == "succeeded"
    with unit_of_work(ticking) as session:
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any("Resuming from checkpoint at step 1" in m for m in messages(ticking, job_id))


def test_cancel_flag_stops_a_running_job_after_its_step(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    job_id = queued_job(live_client, live_auth, ticking)
    set_job_flags(ticking, job_id, cancel_requested=True)
    runner.run_job(job_id, ticking)
    job = job_row(ticking, job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    with unit_of_work(ticking) as session:
        assert session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)).all() == [1]


def test_heartbeat_renews_the_lease_while_running(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = queued_job(live_client, live_auth, live_settings)
    with unit_of_work(live_settings) as session:
        lease.claim(session, job_id, "me", live_settings, "queued", "running")
    first = job_row(live_settings, job_id).lease_expires_at
    with lease.Heartbeat(job_id, "me", live_settings) as beat:
        time.sleep(1.3)
    assert job_row(live_settings, job_id).lease_expires_at > first  # type: ignore[operator]
    assert not beat.lost.is_set()


def test_reaper_requeues_a_job_whose_worker_died_then_fails_it_after_max_attempts(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, sent_tasks: list[Any]
) -> None:
    job_id = queued_job(live_client, live_auth, live_settings)
    for attempt in range(1, live_settings.max_attempts + 1):
        with unit_of_work(live_settings) as session:
            assert lease.claim(session, job_id, f"w{attempt}", live_settings, "queued", "running")
            session.scalars(select(Job).where(Job.id == job_id)).one().lease_expires_at = time.time() - 1
        with unit_of_work(live_settings) as session:
            counts = lease.reap(session, live_settings)
        if attempt < live_settings.max_attempts:
            assert counts["requeued"] == 1
            assert job_row(live_settings, job_id).status == "queued"
            assert sent_tasks[-1] == ("workers.tasks.run_job", [job_id], "training")
    job = job_row(live_settings, job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "worker_lost"
    assert sum("requeued" in m for m in messages(live_settings, job_id)) == live_settings.max_attempts - 1


def test_lost_lease_stops_the_old_worker_from_writing(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    from service.core.storage import LocalStorage
    from workers.context import JobContext, LeaseLost

    job_id = queued_job(live_client, live_auth, ticking)
    with unit_of_work(ticking) as session:
        lease.claim(session, job_id, "old", ticking, "queued", "running")
    beat = lease.Heartbeat(job_id, "old", ticking)
    ctx = JobContext.load(job_id, ticking, LocalStorage(ticking.storage_dir), beat)
    with unit_of_work(ticking) as session:
        session.scalars(select(Job).where(Job.id == job_id)).one().worker_id = "new"
    with pytest.raises(LeaseLost):
        ctx.metrics(1, {"total_steps": 6})


def test_reaper_rewakes_jobs_whose_message_was_lost(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, sent_tasks: list[Any]
) -> None:
    job_id = make_job(live_client, live_auth, jsonl(GOOD_LINES))
    sent_tasks.clear()
    live_settings.stale_queued_seconds = 0
    time.sleep(0.01)
    with unit_of_work(live_settings) as session:
        assert lease.reap(session, live_settings)["rewoken"] == 1
    assert sent_tasks == [("workers.tasks.validate_job", [job_id], "light")]
