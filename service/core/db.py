"""Engine, sessions, and the unit of work that owns the transaction.

Services only `flush()`; `unit_of_work()` (used by the HTTP dependency, the CLI and the Celery
tasks) commits or rolls back. Callbacks registered with `on_commit` (the queue's wake-ups,
`service.core.queue`) run only after the commit that wrote their rows succeeds, and are dropped on
rollback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from service.core.private import private_dir, touch_private
from service.core.settings import Settings, get_settings

log = logging.getLogger(__name__)
AFTER_COMMIT = "rft_after_commit"


def make_engine(url: str, **options: Any) -> Engine:
    """An engine with our connection settings; `options` go to `create_engine` (a `poolclass`, say)."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(url, **options)
    _ping_when_idle(engine)
    return engine


PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection on checkout only if it sat idle for a second or more. `pool_pre_ping`
    pings every checkout: one more round trip per request, under load on connections that were in
    use a millisecond ago (bench/status_poll_bench.py). A connection idle across a database restart
    is pinged, fails, and the pool drops every connection older than that and connects afresh."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise InvalidatePoolError(f"pooled connection failed its ping: {error}") from error


def _private_sqlite_file(url: str) -> None:
    """Create the database file 0600 before SQLite does: its -wal, -shm and -journal files take
    the database file's mode, so every project's rows stay the service user's alone."""
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        path = Path(database)
        private_dir(path.parent, own=False)
        touch_private(path)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits out the writer lock.
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (savepoints need it)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front: a read-then-write transaction never fails halfway
    # on a snapshot another process changed; others wait out busy_timeout instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=make_engine(url), expire_on_commit=False)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return _session_factory((settings or get_settings()).sqlalchemy_url)


@contextmanager
def transaction(factory: Callable[[], Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def unit_of_work(settings: Settings | None = None) -> AbstractContextManager[Session]:
    return transaction(session_factory(settings))


def on_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction commits; drop it on rollback."""
    session.connection()  # begin the transaction now, so a rollback before any SQL still drops it
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(AFTER_COMMIT, []):
        try:
            callback()
        except Exception:
            # The committed row is the truth: the reaper re-sends wake-ups for stale jobs.
            log.exception("after-commit callback failed; the reaper will retry wake-ups")


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_commit(session: Session, previous_transaction: Any) -> None:
    # Any rollback of the outermost transaction (even one that never reached the database)
    # drops the callbacks; a rolled-back savepoint inside it does not.
    if previous_transaction.parent is None:
        session.info.pop(AFTER_COMMIT, None)
