"""Every SQL query on webhook endpoints, their deliveries (the outbox) and the attempt log."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, readable
from service.core.ids import new_id
from service.core.pagination import paginate
from service.core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint


def get(session: Session, subject: AuthSubject, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalars(readable(WebhookEndpoint, subject).where(WebhookEndpoint.id == endpoint_id)).one_or_none()


def count(session: Session, project_id: str) -> int:
    stmt = select(func.count(WebhookEndpoint.seq)).where(WebhookEndpoint.project_id == project_id)
    return int(session.scalar(stmt) or 0)


def page(
    session: Session, subject: AuthSubject, *, after: str | None, limit: int
) -> tuple[Sequence[WebhookEndpoint], bool]:
    return paginate(session, readable(WebhookEndpoint, subject), WebhookEndpoint, after=after, limit=limit)


def page_attempts(
    session: Session, subject: AuthSubject, endpoint_id: str, *, after: str | None, limit: int
) -> tuple[Sequence[WebhookAttempt], bool]:
    stmt = readable(WebhookAttempt, subject).where(WebhookAttempt.endpoint_id == endpoint_id)
    return paginate(session, stmt, WebhookAttempt, after=after, limit=limit)


def subscribed(session: Session, project_id: str, event_type: str) -> list[WebhookEndpoint]:
    """The project's endpoints that asked for `event_type` (the list is JSON: filtered here)."""
    rows = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id).order_by(WebhookEndpoint.seq)
    )
    return [row for row in rows if event_type in row.event_types]


def delete(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint with its deliveries and their log, children first (SQLite enforces foreign keys
    only where its pragma is on)."""
    for table in (WebhookAttempt, WebhookDelivery):
        session.execute(table.__table__.delete().where(table.endpoint_id == endpoint.id))  # type: ignore[attr-defined]
    session.delete(endpoint)
    session.flush()


# -- the outbox, as the light workers drain it -------------------------------------------------------


def claim(session: Session, delivery_id: str, t: float, hold_until: float) -> WebhookDelivery | None:
    """Take the delivery's next attempt if it is pending and due at `t`: one conditional UPDATE that
    counts the attempt and holds it until `hold_until` (a duplicate wake-up meanwhile finds it not due;
    a worker that dies mid-attempt lets it fall due again). The claimed row, or None."""
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= t,
        )
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=hold_until)
    )
    if session.execute(stmt.execution_options(synchronize_session=False)).rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.expire_all()
    return session.scalars(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one()


def endpoint_of(session: Session, delivery: WebhookDelivery) -> WebhookEndpoint:
    return session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id)).one()


def delivery_at(session: Session, delivery_id: str, attempt: int) -> WebhookDelivery | None:
    """The delivery, if it is still pending on attempt number `attempt` (nobody claimed it since)."""
    stmt = select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", WebhookDelivery.attempts == attempt
    )
    return session.scalars(stmt).one_or_none()


def add_attempt(
    session: Session,
    delivery: WebhookDelivery,
    attempt: int,
    attempted_at: float,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
) -> bool:
    """Log attempt number `attempt` of `delivery`, once: False where it is logged already (a write
    retried after its commit went through)."""
    seen = select(WebhookAttempt.seq).where(
        WebhookAttempt.delivery_id == delivery.id, WebhookAttempt.attempt == attempt
    )
    if session.scalar(seen) is not None:
        return False
    session.add(
        WebhookAttempt(
            id=new_id("wha_"),
            project_id=delivery.project_id,
            endpoint_id=delivery.endpoint_id,
            delivery_id=delivery.id,
            event_id=delivery.event_id,
            event_type=delivery.event_type,
            attempt=attempt,
            status_code=status_code,
            latency_ms=latency_ms,
            error=error,
            attempted_at=attempted_at,
        )
    )
    session.flush()
    return True


def overdue(session: Session, before: float) -> Sequence[WebhookDelivery]:
    """Pending deliveries due before `before`: their wake-up was lost, or their worker died mid-attempt."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at < before)
    return session.scalars(stmt).all()
