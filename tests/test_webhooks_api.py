"""Webhook endpoints over the API, as the openai SDK's `client.webhooks` manages them: the secret shown
once, event types checked, and targets that would reach into this server's network refused (attacked
here as a hostile tenant would)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.webhooks.targets import host_allowed
from tests.support.receiver import Receiver

SUCCEEDED: Literal["fine_tuning.job.succeeded"] = "fine_tuning.job.succeeded"


@pytest.fixture
def sdk(client: TestClient, auth: dict[str, str]) -> openai.OpenAI:
    key = auth["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0)


@pytest.fixture
def local_targets(settings: Settings) -> Settings:
    """Receivers on 127.0.0.1 allowed, as an operator would allow their own network."""
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    return settings


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_the_signing_secret_is_answered_at_creation_and_never_again(
    sdk: openai.OpenAI, client: TestClient, auth: dict[str, str], local_targets: Settings, receiver: Receiver
) -> None:
    created = sdk.webhooks.create(name="ci", url=receiver.url, event_types=[SUCCEEDED])
    assert created.id.startswith("we_") and created.object == "webhook_endpoint"
    assert created.signing_secret.startswith("whsec_")
    assert len(base64.b64decode(created.signing_secret.removeprefix("whsec_"))) == 32
    assert created.event_types == [SUCCEEDED] and created.url == receiver.url
    seen = [
        client.get(f"/v1/webhook_endpoints/{created.id}", headers=auth).text,
        client.get("/v1/webhook_endpoints", headers=auth).text,
        client.post(f"/v1/webhook_endpoints/{created.id}", headers=auth, json={"name": "ci2"}).text,
    ]
    secret_part = created.signing_secret.removeprefix("whsec_")
    assert all(secret_part[4:-2] not in text for text in seen)
    retrieved = sdk.webhooks.retrieve(created.id)
    assert retrieved.name == "ci2" and retrieved.signing_secret_hint == created.signing_secret_hint
    assert [w.id for w in sdk.webhooks.list()] == [created.id]


def test_rotating_the_secret_answers_a_new_one(sdk: openai.OpenAI, local_targets: Settings, receiver: Receiver) -> None:
    created = sdk.webhooks.create(name="ci", url=receiver.url, event_types=[SUCCEEDED])
    rotated = sdk.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret


def test_delete_removes_the_endpoint(sdk: openai.OpenAI, local_targets: Settings, receiver: Receiver) -> None:
    created = sdk.webhooks.create(name="ci", url=receiver.url, event_types=[SUCCEEDED])
    deleted = sdk.webhooks.delete(created.id)
    assert deleted.deleted and deleted.id == created.id and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        sdk.webhooks.retrieve(created.id)
    assert list(sdk.webhooks.list()) == []


def test_unknown_event_types_are_400_naming_each(
    client: TestClient, auth: dict[str, str], local_targets: Settings, receiver: Receiver
) -> None:
    body = {"name": "x", "url": receiver.url, "event_types": [SUCCEEDED, "batch.completed", "job.done"]}
    response = client.post("/v1/webhook_endpoints", headers=auth, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "event_types"
    assert "'batch.completed'" in error["message"] and "'job.done'" in error["message"]
    assert "fine_tuning.job.checkpoint.created" in error["message"]  # what would be accepted
    empty = client.post("/v1/webhook_endpoints", headers=auth, json={**body, "event_types": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "event_types"
    assert client.get("/v1/webhook_endpoints", headers=auth).json()["data"] == []


def test_event_types_lists_what_this_server_sends(sdk: openai.OpenAI) -> None:
    assert sdk.webhooks.event_types.list().data == [
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
        "fine_tuning.job.paused",
        "fine_tuning.job.checkpoint.created",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "example.com/hook",
        "http://",
        "http://u:p@1.1.1.1/",
    ],
)
def test_urls_that_are_not_plain_http_or_https_are_400(client: TestClient, auth: dict[str, str], url: str) -> None:
    body = {"name": "x", "url": url, "event_types": [SUCCEEDED]}
    response = client.post("/v1/webhook_endpoints", headers=auth, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"


INTERNAL_TARGETS = [
    "http://127.0.0.1:8000/v1/files",  # this server's own API
    "http://localhost:6379/",  # Redis, by name
    "http://169.254.169.254/latest/meta-data/iam/",  # a cloud metadata service
    "http://[::1]:5432/",
    "http://[::ffff:127.0.0.1]/",  # IPv4 loopback, spelled as IPv6
    "http://10.0.0.5/admin",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0x7f.1/",  # and in hex
    "http://0.0.0.0:8000/",
    "http://224.0.0.1/",  # multicast
]


@pytest.mark.parametrize("url", INTERNAL_TARGETS)
def test_a_tenant_cannot_point_a_webhook_into_the_servers_network(
    client: TestClient, auth: dict[str, str], url: str
) -> None:
    response = client.post(
        "/v1/webhook_endpoints", headers=auth, json={"name": "x", "url": url, "event_types": [SUCCEEDED]}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "url" and error["code"] == "invalid_webhook_url"
    assert "RFT_WEBHOOK_ALLOWED_NETWORKS" in error["message"]
    assert client.get("/v1/webhook_endpoints", headers=auth).json()["data"] == []


def test_an_allowed_endpoint_cannot_be_moved_into_the_servers_network(
    client: TestClient, auth: dict[str, str], settings: Settings, receiver: Receiver
) -> None:
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    created = client.post(
        "/v1/webhook_endpoints", headers=auth, json={"name": "x", "url": receiver.url, "event_types": [SUCCEEDED]}
    ).json()
    moved = client.post(f"/v1/webhook_endpoints/{created['id']}", headers=auth, json={"url": "http://169.254.169.254/"})
    assert moved.status_code == 400 and moved.json()["error"]["param"] == "url"
    assert client.get(f"/v1/webhook_endpoints/{created['id']}", headers=auth).json()["url"] == receiver.url


def test_the_operators_host_allowlist_limits_targets(
    client: TestClient, auth: dict[str, str], local_targets: Settings, receiver: Receiver
) -> None:
    local_targets.webhook_allowed_hosts = ["hooks.example.com", "*.ci.example.org"]
    body = {"name": "x", "url": receiver.url, "event_types": [SUCCEEDED]}
    response = client.post("/v1/webhook_endpoints", headers=auth, json=body)
    assert response.status_code == 400
    assert "RFT_WEBHOOK_ALLOWED_HOSTS" in response.json()["error"]["message"]
    assert host_allowed("a.ci.example.org", local_targets.webhook_allowed_hosts)
    assert not host_allowed("ci.example.org.evil.com", local_targets.webhook_allowed_hosts)
    assert not host_allowed("evilhooks.example.com", local_targets.webhook_allowed_hosts)


def test_a_project_has_at_most_its_limit_of_endpoints(
    client: TestClient, auth: dict[str, str], local_targets: Settings, receiver: Receiver
) -> None:
    local_targets.webhook_max_endpoints = 1
    body = {"name": "x", "url": receiver.url, "event_types": [SUCCEEDED]}
    assert client.post("/v1/webhook_endpoints", headers=auth, json=body).status_code == 200
    second = client.post("/v1/webhook_endpoints", headers=auth, json=body)
    assert second.status_code == 403 and "RFT_WEBHOOK_MAX_ENDPOINTS" in second.json()["error"]["message"]


def test_the_test_call_sends_a_signed_sample_and_answers_its_status(
    sdk: openai.OpenAI, local_targets: Settings, receiver: Receiver
) -> None:
    created = sdk.webhooks.create(name="ci", url=receiver.url, event_types=[SUCCEEDED])
    receiver.secret = created.signing_secret
    result = sdk.webhooks.test(created.id, event_type=SUCCEEDED)
    assert result.status_code == 204 and result.webhook_endpoint_id == created.id
    (delivery,) = receiver.wait_for(1)
    assert delivery.verified and delivery.event["type"] == SUCCEEDED


def test_a_test_call_to_a_receiver_that_is_gone_is_400(
    sdk: openai.OpenAI, local_targets: Settings, receiver: Receiver
) -> None:
    created = sdk.webhooks.create(name="ci", url=receiver.url, event_types=[SUCCEEDED])
    receiver.__exit__()
    with pytest.raises(openai.BadRequestError, match="did not reach"):
        sdk.webhooks.test(created.id, event_type=SUCCEEDED)


def test_unrecognised_fields_are_400(client: TestClient, auth: dict[str, str]) -> None:
    body: dict[str, Any] = {"name": "x", "url": "https://1.1.1.1/", "event_types": [SUCCEEDED], "secret": "mine"}
    response = client.post("/v1/webhook_endpoints", headers=auth, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "secret"
