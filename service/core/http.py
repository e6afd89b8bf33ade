"""FastAPI dependencies shared by every domain: the request's unit of work and its caller."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject, authenticate
from service.core.db import transaction
from service.core.ratelimit import check_rate
from service.core.settings import Settings
from service.core.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_transaction(request: Request) -> AbstractContextManager[Session]:
    """A new unit of work; tests swap `app.state.sessionmaker` for their rolled-back session."""
    return transaction(request.app.state.sessionmaker)


def get_session(request: Request) -> Iterator[Session]:
    with request_transaction(request) as session:
        yield session


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": commit before the response is sent, so a 200 means the row is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]


def get_subject(
    request: Request, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> AuthSubject:
    # Its own short transaction: SQLite allows one writer, and an upload must not hold it while streaming.
    with request_transaction(request) as session:
        subject = authenticate(session, settings, authorization)
    check_rate(request, subject.project_id, subject.key_id)  # 429 past the key's requests per second
    return subject


SubjectDep = Annotated[AuthSubject, Depends(get_subject)]
