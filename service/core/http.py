"""FastAPI dependencies shared by every domain: the request's unit of work and its caller."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth.service import AuthSubject, KeyCache, key_digest, subject_of
from service.core.db import transaction
from service.core.errors import InvalidRequest
from service.core.ratelimit import enforce_rate
from service.core.settings import Settings
from service.core.storage import Storage

# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` one in the threadpool,
# and each such hop cost more than the job lookup itself in bench/status_poll_bench.py.


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_transaction(request: Request) -> AbstractContextManager[Session]:
    """A new unit of work; tests swap `app.state.sessionmaker` for their rolled-back session."""
    return transaction(request.app.state.sessionmaker)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work, as `transaction()`: commit on success, roll back on any exception.
    Opening it does no I/O (a Session connects on first use); ending it runs in the threadpool."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    except BaseException:
        await run_in_threadpool(_end, session, session.rollback)
        raise
    await run_in_threadpool(_end, session, session.commit)


def _end(session: Session, finish: Callable[[], None]) -> None:
    try:
        finish()
    finally:
        session.close()


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": commit before the response is sent, so a 200 means the row is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_subject(
    request: Request, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> AuthSubject:
    """The caller, from the key cache (no I/O, no thread hop) or from the database. Async: anything
    blocking added here must go through `run_in_threadpool`, as the key lookup does."""
    digest = key_digest(settings, authorization)
    cache: KeyCache = request.app.state.key_cache
    subject = cache.get(digest)
    if subject is None:
        subject = await run_in_threadpool(_look_up_key, request, digest)
        cache.put(digest, subject)
    await enforce_rate(request, subject.project_id, subject.key_id)  # 429 past the key's requests per second
    return subject


def _look_up_key(request: Request, digest: str) -> AuthSubject:
    # Its own short transaction: SQLite allows one writer, and an upload must not hold it while streaming.
    with request_transaction(request) as session:
        return subject_of(session, digest)


SubjectDep = Annotated[AuthSubject, Depends(get_subject)]


async def refuse_nul_characters(request: Request) -> None:
    """PostgreSQL text cannot hold NUL (0x00): a request carrying one gets a 400 naming the parameter,
    not a database error. Checked once for every route: path, query and JSON body."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if "\x00" in name or "\x00" in str(value):
            raise InvalidRequest(f"Invalid value for '{name}': must not contain NUL (0x00) characters.", param=name)
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await request.body()  # Starlette caches it: FastAPI's own parse reads the same bytes
        if b"\\u0000" in body:
            try:
                where = _nul_path(json.loads(body))
            except (ValueError, RecursionError):
                return  # not JSON FastAPI can read: it answers that itself
            if where is not None:
                raise InvalidRequest(
                    f"Invalid value for '{where or 'body'}': must not contain NUL (0x00) characters.",
                    param=where or None,
                )


def _nul_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (key or value) in `value` that holds a NUL, else None."""
    items: list[tuple[Any, Any]] = []
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and "\x00" in key:
            return here
        found = _nul_path(item, here)
        if found is not None:
            return found
    return None
