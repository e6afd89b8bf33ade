"""Delivering job events to real receivers on 127.0.0.1 against a real PostgreSQL: written in the
transaction of the status change and sent only after it commits, signed so the openai SDK's verifier
accepts it, retried with backoff, logged attempt by attempt, and never sent to another project."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth.service import AuthSubject, create_api_key
from service.core import queue
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import Job, WebhookDelivery
from service.jobs import service as jobs
from tests.conftest import GOOD_LINES, job_body, jsonl, upload
from tests.support.receiver import Receiver
from workers import webhooks

CANCELLED = "fine_tuning.job.cancelled"


class Outbox:
    """The wake-ups the code sends, run as a light worker would: each when its countdown is up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.due: list[tuple[float, str]] = []  # (monotonic time it is due, delivery id)
        self.countdowns: list[float | None] = []

    def send(self, name: str, args: list[Any], _queue: str, countdown: float | None = None) -> None:
        if name == queue.DELIVER_WEBHOOK:
            self.due.append((time.monotonic() + (countdown or 0), args[0]))
            self.countdowns.append(countdown)

    def drain(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.due:
            self.due.sort()
            at, delivery_id = self.due.pop(0)
            assert at < deadline, "wake-ups still due past the test's deadline"
            time.sleep(max(0.0, at - time.monotonic()))  # the broker holds a retry this long
            webhooks.deliver(delivery_id, self.settings)


@pytest.fixture
def hooks(live_settings: Settings, live_client: TestClient) -> Iterator[Outbox]:
    live_settings.webhook_allowed_networks = ["127.0.0.1/32"]
    live_settings.webhook_backoff_seconds = 0.2
    outbox = Outbox(live_settings)
    queue.set_task_sender(outbox.send)
    yield outbox
    queue.set_task_sender(None)


def endpoint(client: TestClient, auth: dict[str, str], receiver: Receiver, types: list[str] | None = None) -> str:
    body = {"name": "ci", "url": receiver.url, "event_types": types or [CANCELLED]}
    created = client.post("/v1/webhook_endpoints", headers=auth, json=body).json()
    receiver.secret = created["signing_secret"]
    return str(created["id"])


def new_job(client: TestClient, auth: dict[str, str]) -> str:
    file_id = upload(client, auth, jsonl(GOOD_LINES[:4])).json()["id"]
    return str(client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(file_id)).json()["id"])


def attempts(client: TestClient, auth: dict[str, str], endpoint_id: str) -> list[dict[str, Any]]:
    log = client.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", headers=auth).json()["data"]
    return list(reversed(log))  # oldest first


def test_the_event_is_written_with_the_status_change_and_sent_only_after_commit(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint(live_client, live_auth, receiver)
        job_id = new_job(live_client, live_auth)
        with unit_of_work(live_settings) as session:
            project_id = session.scalars(select(Job.project_id).where(Job.id == job_id)).one()
            subject = AuthSubject(project_id=project_id, key_id="k")
            jobs.cancel_job(session, storage_for(live_settings), subject, job_id)
            assert len(session.scalars(select(WebhookDelivery)).all()) == 1  # in the status change's transaction
            assert hooks.due == []  # but nothing sent before it commits
        assert len(hooks.due) == 1
        hooks.drain()
        (delivery,) = receiver.wait_for(1)
        assert delivery.verified


def test_a_rolled_back_status_change_sends_nothing(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint(live_client, live_auth, receiver)
        job_id = new_job(live_client, live_auth)
        with pytest.raises(RuntimeError), unit_of_work(live_settings) as session:
            project_id = session.scalars(select(Job.project_id).where(Job.id == job_id)).one()
            jobs.cancel_job(session, storage_for(live_settings), AuthSubject(project_id, "k"), job_id)
            raise RuntimeError("the request failed after the cancel")
        with unit_of_work(live_settings) as session:
            assert session.scalars(select(WebhookDelivery)).all() == []
        assert hooks.due == [] and receiver.deliveries == []


def test_a_delivery_is_signed_as_openai_signs_and_shaped_as_its_events(
    live_client: TestClient, live_auth: dict[str, str], hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        job_id = new_job(live_client, live_auth)
        live_client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=live_auth)
        hooks.drain()
        (delivery,) = receiver.wait_for(1)
    assert delivery.verified  # by the openai SDK's verify_signature, with the secret shown at creation
    event = delivery.event
    assert event["id"].startswith("evt_") and event["object"] == "event" and event["type"] == CANCELLED
    assert event["data"] == {"id": job_id} and abs(event["created_at"] - time.time()) < 60
    assert delivery.headers["webhook-id"] == event["id"]
    assert delivery.headers["webhook-signature"].startswith("v1,")
    assert not receiver.verify(delivery.body, delivery.headers, secret="whsec_" + "A" * 44)  # a wrong secret fails
    (logged,) = attempts(live_client, live_auth, endpoint_id)
    assert logged["event_id"] == event["id"] and logged["status_code"] == 204 and logged["error"] is None
    assert logged["attempt"] == 1 and logged["latency_ms"] > 0


def test_a_receiver_failing_twice_gets_retries_with_backoff_then_success(
    live_client: TestClient, live_auth: dict[str, str], hooks: Outbox
) -> None:
    with Receiver(fail_first=2) as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        hooks.drain()
        arrived = receiver.wait_for(3)
    assert [d.status for d in arrived] == [500, 500, 204]
    assert len({d.headers["webhook-id"] for d in arrived}) == 1  # the same event each time
    assert all(d.verified for d in arrived)
    gaps = [b.at - a.at for a, b in zip(arrived, arrived[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # 0.2 s, doubling
    assert hooks.countdowns == [None, 0.2, 0.4]
    log = attempts(live_client, live_auth, endpoint_id)
    assert [(a["attempt"], a["status_code"]) for a in log] == [(1, 500), (2, 500), (3, 204)]
    assert log[0]["error"].startswith("HTTP 500") and log[2]["error"] is None


def test_a_delivery_gives_up_after_its_last_attempt(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    live_settings.webhook_max_attempts = 3
    with Receiver(fail_first=100, fail_status=503) as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        hooks.drain()
    assert len(receiver.deliveries) == 3 and hooks.due == []
    assert [a["status_code"] for a in attempts(live_client, live_auth, endpoint_id)] == [503, 503, 503]
    with unit_of_work(live_settings) as session:
        assert session.scalars(select(WebhookDelivery.status)).all() == ["failed"]


def test_a_receiver_that_answers_too_late_is_a_failed_attempt(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    live_settings.webhook_timeout_seconds = 0.3
    live_settings.webhook_max_attempts = 1
    with Receiver(delay=1.0) as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        hooks.drain()
    (logged,) = attempts(live_client, live_auth, endpoint_id)
    assert logged["status_code"] is None and logged["error"] == "timed out after 0.3s"


def test_a_duplicated_wake_up_makes_no_second_attempt(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        ((_, delivery_id),) = hooks.due
        assert webhooks.deliver(delivery_id, live_settings) == "delivered"
        assert webhooks.deliver(delivery_id, live_settings) is None
        assert len(receiver.deliveries) == 1


def test_the_reaper_wakes_a_delivery_whose_wake_up_was_lost(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        hooks.due.clear()  # the broker lost it
        with unit_of_work(live_settings) as session:
            assert webhooks.rewake_overdue(session, live_settings) == 0  # not overdue yet
            session.scalars(select(WebhookDelivery)).one().next_attempt_at -= 3 * live_settings.reaper_interval_seconds
        with unit_of_work(live_settings) as session:
            assert webhooks.rewake_overdue(session, live_settings) == 1
        hooks.drain()
        assert receiver.wait_for(1)[0].verified


def test_a_delivery_rechecks_its_target_and_sends_nothing_inside_the_network(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    """Allowed when created, refused when sent (the operator closed the network, or DNS changed)."""
    live_settings.webhook_max_attempts = 1
    with Receiver() as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        live_settings.webhook_allowed_networks = []
        hooks.drain()
    assert receiver.deliveries == []
    (logged,) = attempts(live_client, live_auth, endpoint_id)
    assert logged["status_code"] is None and logged["error"].startswith("not sent: url host '127.0.0.1'")


def test_a_project_never_receives_another_projects_events(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, hooks: Outbox
) -> None:
    with unit_of_work(live_settings) as session:
        _, key = create_api_key(session, live_settings, "rival")
    rival = {"Authorization": f"Bearer {key}"}
    everything = [CANCELLED, "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.paused"]
    with Receiver() as ours, Receiver() as theirs:
        our_endpoint = endpoint(live_client, live_auth, ours, everything)
        their_endpoint = endpoint(live_client, rival, theirs, everything)
        job_id = new_job(live_client, live_auth)
        live_client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=live_auth)
        hooks.drain()
        assert [d.event["data"]["id"] for d in ours.wait_for(1)] == [job_id]
    assert theirs.deliveries == []
    assert attempts(live_client, rival, their_endpoint) == []
    peek = live_client.get(f"/v1/webhook_endpoints/{our_endpoint}/deliveries", headers=rival)
    assert peek.status_code == 404


def test_while_an_old_secret_is_kept_deliveries_verify_with_either(
    live_client: TestClient, live_auth: dict[str, str], hooks: Outbox
) -> None:
    with Receiver() as receiver:
        endpoint_id = endpoint(live_client, live_auth, receiver)
        old = receiver.secret
        body = {"keep_old_secret_active_for_24_hours": True}
        new = live_client.post(f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret", headers=live_auth, json=body)
        receiver.secret = new.json()["signing_secret"]
        live_client.post(f"/v1/fine_tuning/jobs/{new_job(live_client, live_auth)}/cancel", headers=live_auth)
        hooks.drain()
        (delivery,) = receiver.wait_for(1)
    assert delivery.verified and receiver.verify(delivery.body, delivery.headers, secret=old)
    assert len(delivery.headers["webhook-signature"].split()) == 2
