"""Webhook endpoints of a project, and the events written to their outbox.

An event is written by `emit` in the transaction that makes it happen (a job's status change), one
delivery row per subscribed endpoint of that job's project and no other; a light worker is woken for
each once that transaction commits (workers/webhooks.py sends them), and the reaper wakes any whose
wake-up was lost. So a committed event is delivered at least once, and a rolled-back one never.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.core.errors import InvalidRequest, NotFound, QuotaExceeded
from service.core.ids import new_id
from service.core.queue import wake_webhook
from service.core.settings import Settings
from service.core.tables import WebhookDelivery, WebhookEndpoint, now
from service.webhooks import delivery, repository, signing, targets
from service.webhooks.schemas import EVENT_TYPES, WebhookEndpointCreate, WebhookEndpointUpdate

OLD_SECRET_SECONDS = 24 * 3600


def get_endpoint(session: Session, subject: AuthSubject, endpoint_id: str) -> WebhookEndpoint:
    row = repository.get(session, subject, endpoint_id)
    if row is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id")
    return row


def check_event_types(event_types: list[str]) -> list[str]:
    """The distinct event types asked for, in order; 400 naming the ones this server does not send."""
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(
            f"Unknown event type(s) in event_types: {', '.join(map(repr, unknown))}. This server sends "
            f"{', '.join(EVENT_TYPES)}.",
            param="event_types",
        )
    if not event_types:
        raise InvalidRequest(
            f"event_types is empty: name at least one of {', '.join(EVENT_TYPES)}.", param="event_types"
        )
    return list(dict.fromkeys(event_types))


def create_endpoint(
    session: Session, subject: AuthSubject, body: WebhookEndpointCreate, settings: Settings
) -> WebhookEndpoint:
    event_types = check_event_types(body.event_types)
    targets.check(body.url, settings)  # before any SQL: no transaction is held while DNS answers
    held = repository.count(session, subject.project_id)
    if held >= settings.webhook_max_endpoints:
        raise QuotaExceeded(
            f"Project {subject.project_id} has {held} webhook endpoints, its limit (RFT_WEBHOOK_MAX_ENDPOINTS); "
            "delete one first.",
            param="url",
        )
    row = WebhookEndpoint(
        id=new_id("we_"),
        project_id=subject.project_id,
        name=body.name,
        url=body.url.strip(),
        event_types=event_types,
        secret=signing.new_secret(),
    )
    session.add(row)
    session.flush()
    return row


def update_endpoint(
    session: Session, subject: AuthSubject, endpoint_id: str, body: WebhookEndpointUpdate, settings: Settings
) -> WebhookEndpoint:
    if body.url is not None:
        targets.check(body.url, settings)  # before any SQL: no transaction is held while DNS answers
    row = get_endpoint(session, subject, endpoint_id)
    changed = False
    if body.event_types is not None and (types := check_event_types(body.event_types)) != row.event_types:
        row.event_types, changed = types, True
    if body.url is not None and body.url.strip() != row.url:
        row.url, changed = body.url.strip(), True
    if body.name is not None and body.name != row.name:
        row.name, changed = body.name, True
    if changed:
        row.updated_at = now()
    session.flush()
    return row


def rotate_secret(session: Session, subject: AuthSubject, endpoint_id: str, keep_old: bool) -> WebhookEndpoint:
    """A new signing secret; the old one keeps signing deliveries alongside it for 24 hours if asked."""
    row = get_endpoint(session, subject, endpoint_id)
    row.previous_secret = row.secret if keep_old else None
    row.previous_secret_expires_at = now() + OLD_SECRET_SECONDS if keep_old else None
    row.secret = signing.new_secret()
    row.updated_at = now()
    session.flush()
    return row


def signing_secrets(row: WebhookEndpoint, t: float) -> list[str]:
    old = row.previous_secret if row.previous_secret and (row.previous_secret_expires_at or 0) > t else None
    return [row.secret] + ([old] if old else [])


def delete_endpoint(session: Session, subject: AuthSubject, endpoint_id: str) -> None:
    repository.delete(session, get_endpoint(session, subject, endpoint_id))


def event_body(event_id: str, event_type: str, created_at: int, data: dict[str, Any]) -> str:
    """OpenAI's event shape: `{"id": "evt_...", "object": "event", "created_at", "type", "data"}`."""
    event = {"id": event_id, "object": "event", "created_at": created_at, "type": event_type, "data": data}
    return json.dumps(event, separators=(",", ":"))


def emit(session: Session, project_id: str, event_type: str, data: dict[str, Any]) -> list[str]:
    """Write the event to the outbox of each of the project's endpoints subscribed to it, in this
    transaction; each is sent after it commits. The delivery ids."""
    assert event_type in EVENT_TYPES, event_type
    endpoints = repository.subscribed(session, project_id, event_type)
    if not endpoints:
        return []
    event_id, created = new_id("evt_"), now()
    body = event_body(event_id, event_type, created, data)
    rows = [
        WebhookDelivery(
            id=new_id("whd_"),
            project_id=project_id,
            endpoint_id=endpoint.id,
            event_id=event_id,
            event_type=event_type,
            body=body,
            status="pending",
            attempts=0,
            next_attempt_at=time.time(),
            created_at=created,
        )
        for endpoint in endpoints
    ]
    session.add_all(rows)
    session.flush()
    for row in rows:
        wake_webhook(session, row.id)
    return [row.id for row in rows]


def send_test(url: str, signing_secrets: list[str], event_type: str, settings: Settings) -> int:
    """POST a sample `event_type` event (its data names no real job) to `url` now; the status code it
    answered. Nothing is logged or retried: the answer is the result. Called outside any transaction:
    the receiver may take the whole timeout."""
    if event_type not in EVENT_TYPES:
        raise InvalidRequest(
            f"Unknown event_type {event_type!r}: this server sends {', '.join(EVENT_TYPES)}.", param="event_type"
        )
    event_id = new_id("evt_")
    body = event_body(event_id, event_type, now(), {"id": "ftjob-test"})
    outcome = delivery.post(url, signing_secrets, event_id, body.encode(), settings)
    if outcome.status_code is None:
        raise InvalidRequest(f"The test event did not reach {url}: {outcome.error}", code="webhook_unreachable")
    return outcome.status_code
