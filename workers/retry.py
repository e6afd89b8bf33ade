"""Database calls that outlive a database restart.

A PostgreSQL restart or failover drops every open connection, and for a few seconds refuses new
ones. A web request can fail and be retried by its client; a training step cannot, so each of the
worker's short transactions is retried with backoff for up to `db_retry_seconds`. Only connection
failures are retried (`OperationalError`, `InterfaceError`, a dropped connection), never a broken
query. Every worker write is keyed (events by dedupe key, metrics and checkpoints by step), so the
rare commit whose acknowledgement was lost and is then retried does not record anything twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from service.core.db import unit_of_work
from service.core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_connection_failure(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def in_transaction(settings: Settings, fn: Callable[[Session], T]) -> T:
    """`fn(session)` in its own unit of work, retried while the database is unreachable."""
    deadline = time.monotonic() + settings.db_retry_seconds
    delay = 0.1
    while True:
        try:
            with unit_of_work(settings) as session:
                return fn(session)
        except DBAPIError as exc:
            if not is_connection_failure(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", type(exc.orig).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
