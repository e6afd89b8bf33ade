"""Sending the webhook outbox: one attempt per wake-up, the next one after a backoff.

`emit` (service/webhooks/service.py) writes a delivery row in the transaction of its event and wakes
a light worker once that commits. Here that worker claims the delivery's next attempt with a
conditional UPDATE (so a duplicated wake-up does nothing), POSTs outside any transaction, and logs
the attempt: a 2xx ends it `delivered`; anything else (an error status, a timeout, a refused target)
schedules the next attempt `webhook_backoff_seconds * 2**(n-1)` later (capped at
`webhook_backoff_max_seconds`) with a wake-up held that long by the broker, until
`webhook_max_attempts` make it `failed`. The reaper re-wakes deliveries whose wake-up was lost or
whose worker died mid-attempt. At least once: a receiver may see an event twice (same `webhook-id`).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session

from service.core.queue import wake_webhook
from service.core.settings import Settings
from service.webhooks import delivery, repository
from service.webhooks.service import signing_secrets
from workers.retry import in_transaction

log = logging.getLogger(__name__)
HOLD_MARGIN_SECONDS = 30.0  # how long past its timeout an attempt under way keeps the delivery claimed
Claimed = tuple[int, str, list[str], str, str]  # attempt number, url, secrets, event id, body


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds between failed attempt number `attempt` (from 1) and the next."""
    return min(settings.webhook_backoff_seconds * 2 ** (attempt - 1), settings.webhook_backoff_max_seconds)


def deliver(delivery_id: str, settings: Settings) -> str | None:
    """Make the delivery's next attempt if it is due; the delivery's status after it (None: not due,
    or not pending)."""
    claimed = in_transaction(settings, lambda session: _claim(session, delivery_id, settings))
    if claimed is None:
        return None
    attempt, url, secrets, event_id, body = claimed
    started = time.time()
    outcome = delivery.post(url, secrets, event_id, body.encode(), settings)
    if not outcome.ok:
        log.info("webhook delivery %s attempt %d failed: %s", delivery_id, attempt, outcome.error)

    def record(session: Session) -> str | None:
        row = repository.delivery_at(session, delivery_id, attempt)
        if row is None:  # deleted with its endpoint, or taken over by a later claim
            return None
        if not repository.add_attempt(
            session, row, attempt, started, outcome.status_code, outcome.latency_ms, outcome.error
        ):
            return row.status
        if outcome.ok or attempt >= settings.webhook_max_attempts:
            row.status, row.finished_at = ("delivered" if outcome.ok else "failed"), time.time()
        else:
            delay = backoff(settings, attempt)
            row.next_attempt_at = time.time() + delay
            wake_webhook(session, row.id, countdown=delay)
        return row.status

    return in_transaction(settings, record)


def _claim(session: Session, delivery_id: str, settings: Settings) -> Claimed | None:
    t = time.time()
    row = repository.claim(session, delivery_id, t, t + settings.webhook_timeout_seconds + HOLD_MARGIN_SECONDS)
    if row is None:
        return None
    endpoint = repository.endpoint_of(session, row)
    return row.attempts, endpoint.url, signing_secrets(endpoint, t), row.event_id, row.body


def rewake_overdue(session: Session, settings: Settings) -> int:
    """Wake again the pending deliveries overdue by two reaper intervals (a lost wake-up, a worker
    that died mid-attempt); each is then left alone for as long again. How many."""
    t = time.time()
    rows = repository.overdue(session, t - 2 * settings.reaper_interval_seconds)
    for row in rows:
        row.next_attempt_at = t
        wake_webhook(session, row.id)
    session.flush()
    return len(rows)
