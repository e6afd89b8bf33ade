"""Capability routing: workers report what they have; a job goes to one that can run it, and one that
no live worker could run is refused at creation saying what it needs and what the fleet has.
`GET /v1/workers` shows the fleet to the operator only."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.queue import TRAINING_QUEUE
from service.core.settings import Settings
from service.core.tables import Job, Worker
from service.fleet import repository
from service.fleet.service import own_queue, route
from service.models.registry import SMOLLM2
from tests.conftest import job_body
from workers.fleet import capabilities

GIB = 1024**3
ADMIN = "fleet-admin-key-for-tests-0123456789"


def report(session: Session, worker_id: str, memory_gib: float, *, age: float = 0.0, **extra: Any) -> None:
    values = {
        "hostname": worker_id.split(":")[0],
        "queues": [TRAINING_QUEUE, own_queue(worker_id)],
        "device_type": "cuda",
        "device_count": 1,
        "device_memory_bytes": int(memory_gib * GIB),
        "engines": ["torch"],
        **extra,
    }
    repository.report(session, worker_id, time.time() - age, **values)
    session.commit()  # (inside the test's rolled-back transaction) so a request that fails keeps it


def new_job(client: TestClient, auth: dict[str, str], files: tuple[str, str], **hp: Any) -> Any:
    body = job_body(*files)
    body["model"] = SMOLLM2
    body["method"]["reinforcement"].setdefault("hyperparameters", {}).update(hp)
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_a_job_no_live_worker_can_hold_is_refused_naming_its_needs_and_the_fleet(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    report(db_session, "small-gpu:1", 0.5)
    report(db_session, "dead-big-gpu:2", 200, age=3600)  # its host died an hour ago: it counts for nothing
    refused = new_job(client, auth, files)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "job_too_large", error
    assert "needs at least" in error["message"] and "small-gpu:1 (cuda x1, 0.5 GiB each" in error["message"]
    assert "dead-big-gpu" not in error["message"]

    report(db_session, "big-gpu:3", 80)
    accepted = new_job(client, auth, files)
    assert accepted.status_code == 200, accepted.text
    job = db_session.scalars(select(Job).where(Job.id == accepted.json()["id"])).one()
    assert job.needs_memory_bytes is not None and 0.5 * GIB < job.needs_memory_bytes < 80 * GIB


def test_without_reporting_workers_jobs_are_checked_against_the_settings_and_go_to_the_shared_queue(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session, settings: Settings
) -> None:
    response = new_job(client, auth, files)
    assert response.status_code == 200, response.text
    job = db_session.scalars(select(Job).where(Job.id == response.json()["id"])).one()
    assert route(db_session, settings, job) == TRAINING_QUEUE


def test_a_job_goes_to_an_idle_live_worker_with_the_least_memory_that_fits(
    db_session: Session, settings: Settings
) -> None:
    report(db_session, "a:1", 8)
    report(db_session, "b:2", 80)
    report(db_session, "c:3", 4)
    report(db_session, "stale:4", 16, age=3600)
    repository.set_current_job(db_session, "c:3", "ftjob-other")
    job = Job(needs_memory_bytes=3 * GIB, needs_engine=None)
    assert route(db_session, settings, job) == own_queue("a:1")  # c is busy; a is the smallest idle fit
    job.needs_memory_bytes = 20 * GIB
    assert route(db_session, settings, job) == own_queue("b:2")
    job.needs_memory_bytes = 200 * GIB  # fits nobody now (the API refused such jobs while the fleet was larger)
    assert route(db_session, settings, job) == TRAINING_QUEUE
    job.needs_memory_bytes, job.needs_engine = 1 * GIB, "vllm"
    report(db_session, "b:2", 80, engines=["torch", "vllm"])
    assert route(db_session, settings, job) == own_queue("b:2")  # the only one with vLLM


def test_the_fleet_view_is_for_the_operator_only(
    client: TestClient, auth: dict[str, str], db_session: Session, settings: Settings
) -> None:
    report(db_session, "gpu-host:42", 80)
    report(db_session, "gone-host:7", 80, age=3600)
    repository.set_current_job(db_session, "gpu-host:42", "ftjob-abc")
    db_session.commit()
    assert client.get("/v1/workers", headers=auth).status_code == 404  # off while RFT_ADMIN_KEY is unset
    settings.admin_key = ADMIN
    refused = client.get("/v1/workers", headers=auth)  # a tenant's own valid key
    assert refused.status_code == 401 and "RFT_ADMIN_KEY" in refused.json()["error"]["message"]
    assert client.get("/v1/workers", headers={"Authorization": f"Bearer {ADMIN}x"}).status_code == 401
    listed = client.get("/v1/workers", headers={"Authorization": f"Bearer {ADMIN}"})
    assert listed.status_code == 200, listed.text
    rows = {w["id"]: w for w in listed.json()["data"]}
    assert rows["gpu-host:42"]["healthy"] and rows["gpu-host:42"]["current_job_id"] == "ftjob-abc"
    assert not rows["gone-host:7"]["healthy"]
    assert rows["gpu-host:42"]["device_memory_bytes"] == 80 * GIB


@pytest.mark.parametrize("override", [0.0, 12.0])
def test_a_worker_reports_its_devices_memory_and_engines(tmp_path: Any, override: float) -> None:
    settings = Settings(data_dir=tmp_path, worker_memory_gib=override)
    found = capabilities(settings, [TRAINING_QUEUE, own_queue("h:1")])
    assert found["device_type"] == "cpu" and found["device_count"] == 1  # no GPU on this machine
    assert found["engines"][0] == "torch"
    assert found["device_memory_bytes"] == (int(override * GIB) if override else found["device_memory_bytes"])
    assert found["device_memory_bytes"] > GIB
    assert db_row_shape_matches(found)


def db_row_shape_matches(found: dict[str, Any]) -> bool:
    columns = {c.key for c in Worker.__mapper__.column_attrs}
    return set(found) <= columns


def test_a_job_on_several_devices_goes_to_a_worker_that_offers_them_and_is_refused_where_none_does(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session, settings: Settings
) -> None:
    report(db_session, "one-gpu:1", 80)
    refused = new_job(client, auth, files, n_devices=4, lora_rank=8)
    assert refused.status_code == 400, refused.text
    assert (
        "4 devices" in refused.json()["error"]["message"] and "one-gpu:1 (cuda x1" in refused.json()["error"]["message"]
    )
    report(db_session, "four-gpus:2", 80, device_count=4)
    accepted = new_job(client, auth, files, n_devices=4, lora_rank=8)
    assert accepted.status_code == 200, accepted.text
    job = db_session.scalars(select(Job).where(Job.id == accepted.json()["id"])).one()
    assert route(db_session, settings, job) == own_queue("four-gpus:2")  # not the smaller idle one-GPU worker
    job.method["reinforcement"]["hyperparameters"]["n_devices"] = "auto"  # whatever the worker has
    assert route(db_session, settings, job) == own_queue("four-gpus:2")  # same memory, ties by id
    settings.worker_devices = 3
    assert capabilities(settings, [TRAINING_QUEUE])["device_count"] == 3  # RFT_WORKER_DEVICES, on a CPU too


@pytest.mark.parametrize("bad", [0, 65, 1.5, "two"])
def test_n_devices_out_of_range_is_a_400_naming_it(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], bad: Any
) -> None:
    refused = new_job(client, auth, files, n_devices=bad)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"].endswith("n_devices"), refused.json()


def test_several_devices_with_the_vllm_engine_are_refused_until_it_is_built(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    refused = new_job(client, auth, files, n_devices=2, rollout_engine="vllm", lora_rank=8)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "method.reinforcement.hyperparameters.n_devices" and "torch" in error["message"], error
