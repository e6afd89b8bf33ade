"""A finished job's results file: one `result_files` entry, a `fine-tune-results` CSV of its per-step
metrics under OpenAI's column names first, which the openai SDK lists, retrieves and downloads, scoped
to the project and written once."""

from __future__ import annotations

import csv
import io
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import File, Job
from service.jobs.outcomes import status_changed
from service.jobs.results import to_csv
from tests.conftest import GOOD_LINES, job_body, jsonl, make_key, set_job_flags, upload
from workers import runner, validate


def rows_of(content: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode())))


def test_columns_are_openais_first_then_ours_sorted() -> None:
    step_1 = {
        "total_steps": 2,
        "train_reward_mean": 0.25,
        "kl": 0.01,
        "loss": -0.5,
        "completion_tokens_mean": 12.0,
        "scores": {"graders": [{"name": "exact", "type": "string_check", "train_reward_mean": 0.25}]},
        "sample_parse_error_mean": 0.0,
        "timing": {"step": {"sampling": 1.5, "training": 0.5, "eval": 0.0, "full_iteration": 2.0}},
    }
    step_2 = {**step_1, "train_reward_mean": 0.5, "valid_reward_mean": 0.75, "full_valid_mean_reward": 0.75}
    step_2["scores"] = {"graders": [{"name": "exact", "train_reward_mean": 0.5, "valid_reward_mean": 0.75}]}
    content = to_csv([(2, step_2), (1, step_1)])
    header = content.decode().splitlines()[0].split(",")
    assert header == [
        "step",
        "total_steps",
        "train_reward_mean",
        "valid_reward_mean",
        "full_valid_mean_reward",
        "completion_tokens_mean",
        "scores.exact.train_reward_mean",
        "scores.exact.valid_reward_mean",
        "sample_parse_error_mean",
        "timing.step.sampling",
        "timing.step.training",
        "timing.step.eval",
        "timing.step.full_iteration",
        "kl",
        "loss",
    ]
    first, second = rows_of(content)
    assert first["step"] == "1" and first["valid_reward_mean"] == "" and first["train_reward_mean"] == "0.25"
    assert second["valid_reward_mean"] == "0.75" and second["scores.exact.valid_reward_mean"] == "0.75"


@pytest.fixture
def ticking(live_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    live_settings.trainer = "tests.support.trainers:ticking"
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "0")
    return live_settings


def sdk_for(client: TestClient, auth: dict[str, str]) -> openai.OpenAI:
    key = auth["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0)


def run_to_the_end(client: TestClient, auth: dict[str, str], settings: Settings) -> str:
    file_id = upload(client, auth, jsonl(GOOD_LINES[:4])).json()["id"]
    job_id = str(client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(file_id)).json()["id"])
    validate.validate_job(job_id, settings)
    runner.run_job(job_id, settings)
    return job_id


def results_files(settings: Settings) -> list[str]:
    with unit_of_work(settings) as session:
        return list(session.scalars(select(File.id).where(File.purpose == "fine-tune-results")))


def test_a_succeeded_job_has_one_results_csv_the_sdk_downloads(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    sdk = sdk_for(live_client, live_auth)
    job = sdk.fine_tuning.jobs.retrieve(run_to_the_end(live_client, live_auth, ticking))
    assert job.status == "succeeded"
    (file_id,) = job.result_files
    meta = sdk.files.retrieve(file_id)
    assert meta.purpose == "fine-tune-results" and meta.filename == f"{job.id}-step_metrics.csv"
    content = sdk.files.content(file_id).read()
    assert meta.bytes == len(content)
    rows = rows_of(content)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert list(rows[0])[:3] == ["step", "total_steps", "train_reward_mean"]
    assert float(rows[-1]["train_reward_mean"]) == 1.0  # the ticking trainer's step / total
    assert [f.id for f in sdk.files.list(purpose="fine-tune-results")] == [file_id]
    assert file_id not in [f.id for f in sdk.files.list(purpose="fine-tune")]


def test_another_projects_results_file_is_404(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    job_id = run_to_the_end(live_client, live_auth, ticking)
    (file_id,) = sdk_for(live_client, live_auth).fine_tuning.jobs.retrieve(job_id).result_files
    with unit_of_work(ticking) as session:
        rival = sdk_for(live_client, make_key(session, ticking, "rival"))
    for peek in (rival.files.retrieve, rival.files.content, rival.files.delete):
        with pytest.raises(openai.NotFoundError):
            peek(file_id)
    assert list(rival.files.list(purpose="fine-tune-results")) == []


def test_a_finish_written_again_keeps_one_results_file(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    job_id = run_to_the_end(live_client, live_auth, ticking)
    before = results_files(ticking)
    with unit_of_work(ticking) as session:  # what a retried finishing transaction would do again
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        status_changed(session, storage_for(ticking), job, "succeeded")
    assert results_files(ticking) == before and len(before) == 1
    assert sdk_for(live_client, live_auth).fine_tuning.jobs.retrieve(job_id).result_files == before


def test_deleting_the_results_file_leaves_the_job_readable(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    sdk = sdk_for(live_client, live_auth)
    job_id = run_to_the_end(live_client, live_auth, ticking)
    (file_id,) = sdk.fine_tuning.jobs.retrieve(job_id).result_files
    assert sdk.files.delete(file_id).deleted
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.result_files == [file_id]
    assert [j.id for j in sdk.fine_tuning.jobs.list()] == [job_id]
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(file_id)


def test_deleting_the_job_deletes_its_results_file(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    sdk = sdk_for(live_client, live_auth)
    job_id = run_to_the_end(live_client, live_auth, ticking)
    (file_id,) = sdk.fine_tuning.jobs.retrieve(job_id).result_files
    assert live_client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).status_code == 200
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(file_id)
    assert not [p for p in ticking.storage_dir.rglob("*") if job_id in p.name]


def test_a_store_that_cannot_take_the_results_file_leaves_the_job_finished_saying_so(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    file_id = upload(live_client, live_auth, jsonl(GOOD_LINES[:4])).json()["id"]
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id)).json()["id"]
    validate.validate_job(job_id, ticking)
    with unit_of_work(ticking) as session:
        project_id = session.scalars(select(Job.project_id).where(Job.id == job_id)).one()
    (ticking.storage_dir / "files" / project_id / f"results-{job_id}").mkdir()  # the file cannot land there
    runner.run_job(job_id, ticking)
    job = sdk_for(live_client, live_auth).fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.result_files == []
    events = sdk_for(live_client, live_auth).fine_tuning.jobs.list_events(job_id, limit=5)
    assert any(e.level == "warn" and "results file could not be written" in e.message for e in events)


def test_a_job_that_failed_after_training_steps_has_its_results_file(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    live_settings.trainer = "tests.support.trainers:crashing_after_two_steps"
    sdk = sdk_for(live_client, live_auth)
    job = sdk.fine_tuning.jobs.retrieve(run_to_the_end(live_client, live_auth, live_settings))
    assert job.status == "failed"
    (file_id,) = job.result_files
    assert [r["step"] for r in rows_of(sdk.files.content(file_id).read())] == ["1", "2"]


@pytest.mark.parametrize("how", ["invalid file", "cancelled while queued"])
def test_a_job_that_never_trained_has_no_results_file(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, how: str
) -> None:
    lines: list[Any] = [{"messages": []}] if how == "invalid file" else GOOD_LINES[:4]
    file_id = upload(live_client, live_auth, jsonl(lines)).json()["id"]
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id)).json()["id"]
    if how == "invalid file":
        validate.validate_job(job_id, live_settings)
    else:
        live_client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=live_auth)
    job = live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).json()
    assert job["status"] in ("failed", "cancelled") and job["result_files"] == []
    assert results_files(live_settings) == []


def test_a_paused_job_gets_its_results_file_when_cancelled_not_before(
    live_client: TestClient, live_auth: dict[str, str], ticking: Settings
) -> None:
    file_id = upload(live_client, live_auth, jsonl(GOOD_LINES[:4])).json()["id"]
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id)).json()["id"]
    validate.validate_job(job_id, ticking)
    set_job_flags(ticking, job_id, pause_requested=True)
    runner.run_job(job_id, ticking)
    sdk = sdk_for(live_client, live_auth)
    assert sdk.fine_tuning.jobs.retrieve(job_id).result_files == []  # paused: not finished
    cancelled = sdk.fine_tuning.jobs.cancel(job_id)
    assert cancelled.status == "cancelled"
    (results,) = cancelled.result_files
    assert [r["step"] for r in rows_of(sdk.files.content(results).read())] == ["1"]
