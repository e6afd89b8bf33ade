from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.ids import new_id
from service.core.tables import Checkpoint, Job
from service.jobs import repository
from tests.conftest import job_body


def create(client: TestClient, auth: dict[str, str], body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/fine_tuning/jobs", headers={**auth, **headers}, json=body)


def set_status(db_session: Session, job_id: str, status: str) -> None:
    db_session.get_one(Job, db_session.query(Job.seq).filter(Job.id == job_id).scalar()).status = status
    db_session.commit()


def test_create_returns_job_object_and_wakes_validation_after_commit(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], sent_tasks: list[Any]
) -> None:
    train, valid = files
    response = create(client, auth, job_body(train, valid, suffix="math", seed=7, metadata={"team": "a"}))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["id"].startswith("ftjob-")
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "validating_files"
    assert job["error"] is None
    assert job["seed"] == 7
    assert job["user_provided_suffix"] == "math"
    assert job["metadata"] == {"team": "a"}
    assert job["method"]["reinforcement"]["hyperparameters"]["n_epochs"] == "auto"
    assert job["hyperparameters"]["reasoning_effort"] == "default"
    assert sent_tasks == [("workers.tasks.validate_job", [job["id"]], "light")]


def test_seed_is_generated_when_absent(client: TestClient, auth: dict[str, str], files: tuple[str, str]) -> None:
    seed = create(client, auth, job_body(files[0])).json()["seed"]
    assert 0 <= seed <= 2147483647


@pytest.mark.parametrize(
    ("patch", "param", "words"),
    [
        ({"colour": "blue"}, "colour", "Unrecognized request argument"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"suffix": "x" * 65}, "suffix", "at most 64"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"method": {"type": "supervised", "supervised": {}}}, "method.type", "not supported"),
        ({"method": None}, "method", "reinforcement"),
        ({"method": {"type": "reinforcement"}}, "method.reinforcement", "grader"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "vibes"}}}},
            "method.reinforcement.grader.type",
            "string_check",
        ),
        (
            {
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {"grader": {"type": "multi"}, "hyperparameters": {"n_epochs": 0}},
                }
            },
            "method.reinforcement.hyperparameters.n_epochs",
            "must be 'auto' or an integer >= 1 and <= 50, got 0",
        ),
        (
            {
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {"grader": {"type": "multi"}, "hyperparameters": {"warp": 9}},
                }
            },
            "method.reinforcement.hyperparameters.warp",
            "Unrecognized",
        ),
        ({"training_file": "file-missing"}, "training_file", "does not exist"),
    ],
)
def test_bad_create_is_400_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    sent_tasks: list[Any],
    patch: dict[str, Any],
    param: str,
    words: str,
) -> None:
    body = job_body(files[0])
    body.update(patch)
    if body.get("method") is None:
        body.pop("method")
    response = create(client, auth, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert sent_tasks == []


def test_hyperparameters_accept_values_and_auto(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    body = job_body(files[0])
    body["method"]["reinforcement"]["hyperparameters"] = {
        "n_epochs": 3,
        "batch_size": "auto",
        "compute_multiplier": 2.5,
        "reasoning_effort": "default",  # tiny-random-llama has no thinking switch (test_reasoning_effort.py)
    }
    job = create(client, auth, body).json()
    assert job["hyperparameters"]["n_epochs"] == 3
    assert job["hyperparameters"]["compute_multiplier"] == 2.5
    assert job["hyperparameters"]["learning_rate_multiplier"] == "auto"


def test_deprecated_top_level_hyperparameters_move_into_the_method_as_the_sdk_sends_them(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    import openai

    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client, max_retries=0
    )
    body = job_body(files[0])
    body["method"]["reinforcement"]["hyperparameters"] = {"batch_size": 2}
    job = sdk.fine_tuning.jobs.create(
        model=body["model"],
        training_file=files[0],
        method=body["method"],
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5, "batch_size": 2},
    )
    stored = job.method.reinforcement.hyperparameters  # type: ignore[union-attr]
    assert stored is not None
    assert (stored.n_epochs, stored.learning_rate_multiplier, stored.batch_size) == (2, 0.5, 2)
    assert job.hyperparameters.n_epochs == 2


@pytest.mark.parametrize(
    ("top", "param", "words"),
    [
        ({"batch_size": 4}, "hyperparameters.batch_size", "give it once"),
        ({"beta": 0.1}, "hyperparameters.beta", "method.reinforcement.hyperparameters.beta"),
        ({"n_epochs": 0}, "hyperparameters.n_epochs", ">= 1"),
    ],
)
def test_top_level_hyperparameters_that_conflict_or_do_not_belong_there_are_400_naming_the_new_place(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], top: dict[str, Any], param: str, words: str
) -> None:
    body = job_body(files[0], hyperparameters=top)
    body["method"]["reinforcement"]["hyperparameters"] = {"batch_size": 2}
    response = create(client, auth, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert words in response.json()["error"]["message"]


def test_top_level_hyperparameters_without_a_method_are_told_where_both_go(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    body = {"model": "tiny-random-llama", "training_file": files[0], "hyperparameters": {"n_epochs": 2}}
    response = create(client, auth, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "method"
    assert "hyperparameters" in response.json()["error"]["message"]


def test_idempotency_key_returns_the_same_job(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], sent_tasks: list[Any]
) -> None:
    body = job_body(files[0])
    first = create(client, auth, body, **{"Idempotency-Key": "abc"}).json()
    again = create(client, auth, body, **{"Idempotency-Key": "abc"}).json()
    assert again["id"] == first["id"]
    assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 1
    assert len(sent_tasks) == 1
    other = create(client, auth, {**body, "suffix": "different"}, **{"Idempotency-Key": "abc"})
    assert other.status_code == 409
    assert "different request body" in other.json()["error"]["message"]


def test_list_paginates_and_filters_by_metadata(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    ids = [create(client, auth, job_body(files[0], metadata={"run": str(i % 2)})).json()["id"] for i in range(5)]
    page = client.get("/v1/fine_tuning/jobs", headers=auth, params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    rest = client.get("/v1/fine_tuning/jobs", headers=auth, params={"after": ids[3]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:]
    odd = client.get("/v1/fine_tuning/jobs", headers=auth, params={"metadata[run]": "1"}).json()
    assert [j["id"] for j in odd["data"]] == [ids[3], ids[1]]


def test_cancel_of_queued_job_is_immediate(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    set_status(db_session, job_id, "queued")
    job = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 400
    assert "already cancelled" in again.json()["error"]["message"]


def test_cancel_and_pause_of_running_job_are_flags(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    set_status(db_session, job_id, "running")
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "running"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["status"] == "running"
    db_session.expire_all()
    row = db_session.query(Job).filter(Job.id == job_id).one()
    assert row.pause_requested and row.cancel_requested


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "validating_files"])
def test_pause_outside_queued_or_running_is_400(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session, status: str
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    set_status(db_session, job_id, status)
    response = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)
    assert response.status_code == 400
    assert status in response.json()["error"]["message"]


def test_resume_requeues_a_paused_job_and_wakes_training(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session, sent_tasks: list[Any]
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth).status_code == 400
    set_status(db_session, job_id, "queued")
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth).json()["status"] == "queued"
    assert sent_tasks[-1] == ("workers.tasks.run_job", [job_id], "training")


def test_events_are_newest_first_and_paginated(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth).json()
    assert events["object"] == "list"
    messages = [e["message"] for e in events["data"]]
    assert messages[-1].startswith("Created fine-tuning job")
    assert all(e["object"] == "fine_tuning.job.event" and e["id"].startswith("ftevent-") for e in events["data"])
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth, params={"limit": 1}).json()
    assert page["has_more"] is True
    after = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth, params={"after": page["data"][0]["id"]}
    ).json()
    assert [e["id"] for e in page["data"] + after["data"]] == [e["id"] for e in events["data"]]


def test_checkpoints_are_listed_newest_first(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    job = db_session.query(Job).filter(Job.id == job_id).one()
    for step in (10, 20, 30):
        db_session.add(
            Checkpoint(
                id=new_id("ftckpt-"),
                project_id=job.project_id,
                job_id=job_id,
                step_number=step,
                fine_tuned_model_checkpoint=f"ft:x:y::z:ckpt-step-{step}",
                metrics={"step": step},
                storage_key=f"checkpoints/{step}",
            )
        )
    db_session.commit()
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth, params={"limit": 2}).json()
    assert [c["step_number"] for c in page["data"]] == [30, 20]
    assert page["has_more"] is True
    assert page["first_id"] == page["data"][0]["id"]
    assert page["data"][0]["object"] == "fine_tuning.job.checkpoint"
    assert page["data"][0]["fine_tuning_job_id"] == job_id
    rest = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth, params={"after": page["last_id"]}
    ).json()
    assert [c["step_number"] for c in rest["data"]] == [10]


def test_rolled_back_create_sends_no_wake_up(
    db_session: Session, settings: Any, auth: dict[str, str], sent_tasks: list[Any]
) -> None:
    from service.core.queue import wake_validation

    job = Job(id=new_id("ftjob-"), project_id="p", model="m", training_file="f", seed=1, method={})
    wake_validation(db_session, job.id)
    db_session.rollback()
    db_session.commit()
    assert sent_tasks == []


def test_duplicate_metrics_and_dedupe_events_are_ignored(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    job_id = create(client, auth, job_body(files[0])).json()["id"]
    job = db_session.query(Job).filter(Job.id == job_id).one()
    assert repository.record_metrics(db_session, job, 1, {"x": 1})
    assert not repository.record_metrics(db_session, job, 1, {"x": 1})
    assert repository.add_event(db_session, job, "m", dedupe_key="metrics:1") is not None
    assert repository.add_event(db_session, job, "m", dedupe_key="metrics:1") is None
