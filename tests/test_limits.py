"""Attacks on the per-project limits: a tenant that floods requests, fills its storage or queue, or
sends an oversized body is refused in OpenAI's error shape, nothing of it is stored, and the other
tenant is not affected. The rate limiter is attacked in-process and against the real local Redis."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.auth.service import create_api_key
from service.core.bodylimit import BodySizeLimit
from service.core.db import unit_of_work
from service.core.ratelimit import MemoryBuckets, RedisBuckets
from service.core.settings import Settings
from service.core.tables import File, Job, JobEvent, Project
from tests.conftest import GOOD_LINES, job_body, jsonl, make_key, set_job_flags, upload
from workers import lease, validate

ClientFactory = Callable[..., TestClient]


@pytest.fixture
def limited(settings: Settings, db_session: Session, sent_tasks: list[Any]) -> Iterator[ClientFactory]:
    """`limited(**settings)`: an API client whose settings carry those limits."""
    opened: list[TestClient] = []

    def make(**limits: Any) -> TestClient:
        app = create_app(Settings(**{**settings.model_dump(), **limits}))  # validated, as from the env
        app.state.sessionmaker = lambda: db_session
        client = TestClient(app)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def flood(client: TestClient, auth: dict[str, str], n: int) -> list[Any]:
    return [client.get("/v1/files", headers=auth) for _ in range(n)]


def assert_rate_limited(response: Any) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "requests per second" in error["message"] and "burst 3" in error["message"]
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) > 0


@pytest.fixture
def redis_buckets(redis_server: str) -> Iterator[RedisBuckets]:
    prefix = f"rft-test:{uuid.uuid4().hex}:"
    yield RedisBuckets(redis_server, prefix=prefix)
    client = redis.Redis.from_url(redis_server)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_flooding_tenant_gets_429_with_retry_after_and_other_tenant_is_unaffected(
    limited: ClientFactory,
    auth: dict[str, str],
    other_auth: dict[str, str],
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    client = limited(requests_per_second=0.5, request_burst=3)
    if backend == "redis":
        client.app.state.rate_buckets = request.getfixturevalue("redis_buckets")  # type: ignore[attr-defined]
    answers = flood(client, auth, 6)
    assert [r.status_code for r in answers[:3]] == [200, 200, 200]
    for refused in answers[3:]:
        assert_rate_limited(refused)
    assert [r.status_code for r in flood(client, other_auth, 3)] == [200, 200, 200]


def test_redis_buckets_are_shared_by_every_api_process(
    limited: ClientFactory, auth: dict[str, str], redis_server: str, redis_buckets: RedisBuckets
) -> None:
    first = limited(requests_per_second=0.5, request_burst=3, rate_limit_redis_url=redis_server)
    second = limited(requests_per_second=0.5, request_burst=3, rate_limit_redis_url=redis_server)
    assert isinstance(first.app.state.rate_buckets, RedisBuckets)  # type: ignore[attr-defined]
    for client in (first, second):
        client.app.state.rate_buckets = redis_buckets  # type: ignore[attr-defined]
    assert [r.status_code for r in flood(first, auth, 2) + flood(second, auth, 1)] == [200, 200, 200]
    assert_rate_limited(flood(second, auth, 1)[0])  # the bucket the first process drained


@pytest.mark.parametrize("buckets", [MemoryBuckets, "redis"])
def test_bucket_refills_at_its_rate_and_the_wait_it_announces_is_enough(
    buckets: Any, request: pytest.FixtureRequest
) -> None:
    bucket = request.getfixturevalue("redis_buckets") if buckets == "redis" else buckets()
    key = uuid.uuid4().hex
    assert [bucket.take(key, 20.0, 2) for _ in range(2)] == [0.0, 0.0]
    wait = bucket.take(key, 20.0, 2)
    assert 0 < wait <= 0.05 + 1e-6
    time.sleep(wait + 0.01)
    assert bucket.take(key, 20.0, 2) == 0.0


def count(db_session: Session, model: Any, project: str) -> int:
    project_id = db_session.scalar(select(Project.id).where(Project.name == project))
    return int(db_session.scalar(select(func.count(model.seq)).where(model.project_id == project_id)) or 0)


def stored_files(root: Path) -> list[Path]:
    return [p for p in (root / "storage" / "files").rglob("*") if p.is_file()]


def test_project_at_its_file_limit_is_refused_with_the_limit_and_use_and_nothing_is_stored(
    limited: ClientFactory,
    auth: dict[str, str],
    other_auth: dict[str, str],
    db_session: Session,
    settings: Settings,
) -> None:
    client = limited(max_files=2)
    for _ in range(2):
        assert upload(client, auth, jsonl(GOOD_LINES)).status_code == 200
    refused = upload(client, auth, jsonl(GOOD_LINES))
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and error["param"] == "file"
    assert "holds 2 files" in error["message"] and "(max_files): 2" in error["message"]
    assert count(db_session, File, "acme") == 2 and len(stored_files(settings.data_dir)) == 2
    assert upload(client, other_auth, jsonl(GOOD_LINES)).status_code == 200


def test_project_at_its_byte_limit_is_refused_before_and_after_the_body_and_nothing_is_stored(
    limited: ClientFactory, auth: dict[str, str], db_session: Session, settings: Settings
) -> None:
    content = jsonl(GOOD_LINES)
    client = limited(max_stored_bytes=len(content) + 10)
    assert upload(client, auth, content).status_code == 200
    small = upload(client, auth, content[:20])  # fits the multipart overhead: refused after the body
    big = upload(client, auth, content * 2000)  # declared too large: refused before the body is read
    for refused in (small, big):
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        assert f"stores {len(content)} bytes" in message and f"(max_stored_bytes): {len(content) + 10}" in message
    adding = int(re.search(r"; (\d+) more", big.json()["error"]["message"]).group(1))  # type: ignore[union-attr]
    assert adding < len(content) * 2000, "judged on its Content-Length, before the body was read"
    assert count(db_session, File, "acme") == 1 and len(stored_files(settings.data_dir)) == 1


def test_project_at_its_queued_jobs_limit_is_refused_and_no_job_is_added(
    limited: ClientFactory, auth: dict[str, str], other_auth: dict[str, str], db_session: Session
) -> None:
    client = limited(max_queued_jobs=1)
    train = upload(client, auth, jsonl(GOOD_LINES)).json()["id"]
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(train)).status_code == 200
    refused = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(train))
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "has 1 jobs validating or queued" in error["message"] and "(max_queued_jobs): 1" in error["message"]
    assert count(db_session, Job, "acme") == 1
    other_train = upload(client, other_auth, jsonl(GOOD_LINES)).json()["id"]
    assert client.post("/v1/fine_tuning/jobs", headers=other_auth, json=job_body(other_train)).status_code == 200


def test_per_project_override_lowers_by_name_and_raises_by_id(
    limited: ClientFactory, db_session: Session, settings: Settings
) -> None:
    lowered, raised = make_key(db_session, settings, "small-co"), make_key(db_session, settings, "big-co")
    big_id = db_session.scalar(select(Project.id).where(Project.name == "big-co"))
    overrides = {"small-co": {"max_files": 1}, str(big_id): {"max_files": 3}}
    client = limited(max_files=2, project_limits=overrides)
    results = {
        name: [upload(client, auth, jsonl(GOOD_LINES)).status_code for _ in range(4)]
        for name, auth in (("small-co", lowered), ("big-co", raised))
    }
    assert results == {"small-co": [200, 403, 403, 403], "big-co": [200, 200, 200, 403]}


def test_unknown_limit_in_an_override_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="max_fils"):
        Settings(project_limits={"acme": {"max_fils": 3}})  # type: ignore[dict-item]


def test_oversized_json_body_is_refused_with_413_declared_or_chunked(
    limited: ClientFactory, auth: dict[str, str], files: tuple[str, str]
) -> None:
    client = limited(max_json_body_bytes=2000)
    body = job_body(files[0], metadata={"pad": "x" * 5000})
    raw = json.dumps(body).encode()
    declared = client.post("/v1/fine_tuning/jobs", headers={**auth, "content-type": "application/json"}, content=raw)
    chunked = client.post(
        "/v1/fine_tuning/jobs",
        headers={**auth, "content-type": "application/json"},
        content=iter([raw[i : i + 500] for i in range(0, len(raw), 500)]),
    )
    for refused in (declared, chunked):
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["code"] == "request_too_large" and "at most 2000 bytes" in error["message"]
    # A small body passes, and a multipart upload far over the JSON cap still streams in.
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0])).status_code == 200
    assert upload(client, auth, jsonl(GOOD_LINES * 40)).status_code == 200


def test_body_cap_stops_reading_an_endless_body_one_chunk_past_the_cap() -> None:
    pulled = 0

    async def endless() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def app(*_: Any) -> None:
        raise AssertionError("the application must not see a body over the cap")

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(BodySizeLimit(app, max_bytes=10_000)(scope, endless, send))  # type: ignore[arg-type]
    assert pulled == 11 and sent[0]["status"] == 413


def test_project_at_its_running_limit_waits_in_the_queue_while_another_project_starts(
    live_client: TestClient, live_settings: Settings, sent_tasks: list[Any]
) -> None:
    settings = Settings(**{**live_settings.model_dump(), "max_running_jobs": 1, "reaper_interval_seconds": 0.05})
    keys = {}
    with unit_of_work(settings) as session:
        for project in ("busy", "calm"):
            keys[project] = {"Authorization": f"Bearer {create_api_key(session, settings, project)[1]}"}

    def queued(project: str) -> str:
        train = upload(live_client, keys[project], jsonl(GOOD_LINES)).json()["id"]
        job_id = str(live_client.post("/v1/fine_tuning/jobs", headers=keys[project], json=job_body(train)).json()["id"])
        validate.validate_job(job_id, settings)
        return job_id

    first, second, other = queued("busy"), queued("busy"), queued("calm")

    def claim(job_id: str, worker: str) -> bool:
        with unit_of_work(settings) as session:
            return lease.claim(session, job_id, worker, settings, "queued", "running")

    assert claim(first, "w1") and not claim(second, "w2") and claim(other, "w3")
    with unit_of_work(settings) as session:
        waiting = session.scalars(select(Job).where(Job.id == second)).one()
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == second)).all()
    assert waiting.status == "queued" and waiting.worker_id is None and waiting.attempts == 0
    assert any("runs 1 jobs, its limit (max_running_jobs) is 1" in e for e in events)
    time.sleep(0.15)  # two reaper intervals: the waiting job is woken again
    sent_tasks.clear()
    with unit_of_work(settings) as session:
        lease.reap(session, settings)
    assert ("workers.tasks.run_job", [second], "training") in sent_tasks
    set_job_flags(settings, first, status="succeeded", worker_id=None, lease_expires_at=None)
    assert claim(second, "w2")
