"""`/v1/webhook_endpoints`: what the openai SDK's `client.webhooks` calls, and our delivery log."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.core.http import SessionDep, SettingsDep, SubjectDep, request_transaction
from service.core.pagination import list_body
from service.webhooks import repository, service
from service.webhooks.schemas import (
    EVENT_TYPES,
    DeliveryAttemptList,
    DeliveryAttemptObject,
    EventTypeList,
    RotateSecret,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointObject,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookTest,
    WebhookTestResult,
)

router = APIRouter(prefix="/v1", tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/webhook_endpoints", response_model=WebhookEndpointWithSecret)
def create_endpoint(
    body: WebhookEndpointCreate, session: SessionDep, subject: SubjectDep, settings: SettingsDep
) -> WebhookEndpointWithSecret:
    """Create a webhook endpoint; its signing secret is in this answer and never shown again."""
    return WebhookEndpointWithSecret.shown_once(service.create_endpoint(session, subject, body, settings))


@router.get("/webhook_endpoints", response_model=WebhookEndpointList)
def list_endpoints(
    session: SessionDep, subject: SubjectDep, after: str | None = None, limit: Limit = 20
) -> dict[str, object]:
    """List the project's webhook endpoints, newest first."""
    rows, has_more = repository.page(session, subject, after=after, limit=limit)
    return list_body([WebhookEndpointObject.of(r).model_dump() for r in rows], has_more)


@router.get("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject)
def retrieve_endpoint(webhook_endpoint_id: str, session: SessionDep, subject: SubjectDep) -> WebhookEndpointObject:
    """Retrieve a webhook endpoint (its secret only as a hint)."""
    return WebhookEndpointObject.of(service.get_endpoint(session, subject, webhook_endpoint_id))


@router.post("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject)
def update_endpoint(
    webhook_endpoint_id: str,
    body: WebhookEndpointUpdate,
    session: SessionDep,
    subject: SubjectDep,
    settings: SettingsDep,
) -> WebhookEndpointObject:
    """Change a webhook endpoint's name, url or event types."""
    return WebhookEndpointObject.of(service.update_endpoint(session, subject, webhook_endpoint_id, body, settings))


@router.delete("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointDeleted)
def delete_endpoint(webhook_endpoint_id: str, session: SessionDep, subject: SubjectDep) -> WebhookEndpointDeleted:
    """Delete a webhook endpoint with its pending deliveries and delivery log."""
    service.delete_endpoint(session, subject, webhook_endpoint_id)
    return WebhookEndpointDeleted(id=webhook_endpoint_id)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(
    webhook_endpoint_id: str, session: SessionDep, subject: SubjectDep, body: RotateSecret | None = None
) -> WebhookEndpointWithSecret:
    """Replace the signing secret (optionally signing with the old one too for 24 hours)."""
    keep_old = body.keep_old_secret_active_for_24_hours if body else False
    return WebhookEndpointWithSecret.shown_once(service.rotate_secret(session, subject, webhook_endpoint_id, keep_old))


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test", response_model=WebhookTestResult)
def test_endpoint(
    webhook_endpoint_id: str, body: WebhookTest, request: Request, subject: SubjectDep, settings: SettingsDep
) -> WebhookTestResult:
    """Send a signed sample event to the endpoint now and answer the status code it returned."""
    with request_transaction(request) as session:  # read, then let go before the receiver is called
        row = service.get_endpoint(session, subject, webhook_endpoint_id)
        url, secrets = row.url, service.signing_secrets(row, time.time())
    status = service.send_test(url, secrets, body.event_type, settings)
    return WebhookTestResult(event_type=body.event_type, status_code=status, webhook_endpoint_id=webhook_endpoint_id)


@router.get("/webhook_endpoints/{webhook_endpoint_id}/deliveries", response_model=DeliveryAttemptList)
def list_deliveries(
    webhook_endpoint_id: str, session: SessionDep, subject: SubjectDep, after: str | None = None, limit: Limit = 20
) -> dict[str, object]:
    """The endpoint's delivery log: every attempt, newest first, with status code, latency and error."""
    service.get_endpoint(session, subject, webhook_endpoint_id)
    rows, has_more = repository.page_attempts(session, subject, webhook_endpoint_id, after=after, limit=limit)
    return list_body([DeliveryAttemptObject.of(r).model_dump() for r in rows], has_more)


@router.get("/webhook_event_types", response_model=EventTypeList)
def list_event_types(subject: SubjectDep) -> EventTypeList:
    """The event types this server sends."""
    return EventTypeList(data=list(EVENT_TYPES))
