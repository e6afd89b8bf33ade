"""Shapes of `/v1/webhook_endpoints` (the openai SDK's `client.webhooks`) and of the events sent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.tables import WebhookAttempt, WebhookEndpoint
from service.webhooks.signing import hint

# OpenAI's fine-tuning events, then ours.
EVENT_TYPES = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.paused",
    "fine_tuning.job.checkpoint.created",
)
EventTypes = list[str]


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_types: EventTypes
    name: str = Field(min_length=1, max_length=128)
    url: str


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_types: EventTypes | None = None
    name: str | None = Field(default=None, min_length=1, max_length=128)
    url: str | None = None


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = False


class WebhookTest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int
    event_types: list[str]
    name: str
    url: str
    signing_secret_hint: str

    @classmethod
    def of(cls, row: WebhookEndpoint) -> WebhookEndpointObject:
        return cls(
            id=row.id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            event_types=list(row.event_types),
            name=row.name,
            url=row.url,
            signing_secret_hint=hint(row.secret),
        )


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str  # answered at creation and rotation only; never again

    @classmethod
    def shown_once(cls, row: WebhookEndpoint) -> WebhookEndpointWithSecret:
        return cls(**WebhookEndpointObject.of(row).model_dump(exclude={"object"}), signing_secret=row.secret)


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookTestResult(BaseModel):
    event_type: str
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    status_code: int
    success: Literal[True] = True
    webhook_endpoint_id: str


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class DeliveryAttemptObject(BaseModel):
    """One attempt to deliver one event (ours: OpenAI has no delivery log in its API)."""

    id: str
    object: Literal["webhook_endpoint.delivery_attempt"] = "webhook_endpoint.delivery_attempt"
    delivery_id: str
    event_id: str
    event_type: str
    attempt: int
    status_code: int | None
    latency_ms: float | None
    error: str | None
    created_at: int

    @classmethod
    def of(cls, row: WebhookAttempt) -> DeliveryAttemptObject:
        return cls(
            id=row.id,
            delivery_id=row.delivery_id,
            event_id=row.event_id,
            event_type=row.event_type,
            attempt=row.attempt,
            status_code=row.status_code,
            latency_ms=row.latency_ms,
            error=row.error,
            created_at=int(row.attempted_at),
        )


class DeliveryAttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryAttemptObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
