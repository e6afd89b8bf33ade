"""API keys and tenancy. Keys are shown once and stored only as HMAC-SHA256(secret, key).

`readable()` is the one place every tenant-owned query is scoped to the caller's project.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from service.auth import repository
from service.core.errors import InvalidRequest, Unauthorized
from service.core.ids import new_id
from service.core.settings import Settings
from service.core.tables import ApiKey, Checkpoint, CheckpointPermission, Project

KEY_PREFIX = "rft-"
T = TypeVar("T")


@dataclass(frozen=True)
class AuthSubject:
    project_id: str
    key_id: str

    @classmethod
    def acting_for(cls, project_id: str) -> AuthSubject:
        """The project as the service acts for it without a key (a worker running its job), scoped alike."""
        return cls(project_id=project_id, key_id="")


def hash_key(key: str, secret: str) -> str:
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def create_api_key(session: Session, settings: Settings, project_name: str) -> tuple[Project, str]:
    """Create (or reuse) the project named `project_name` and a new key for it; return the key."""
    if not project_name or len(project_name) > 128:
        raise InvalidRequest("project name must be 1-128 characters", param="project")
    project = repository.project_by_name(session, project_name)
    if project is None:
        project = Project(id=new_id("proj_"), name=project_name)
        session.add(project)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key_"), project_id=project.id, key_hash=hash_key(key, settings.secret_key), hint=key[:8])
    )
    session.flush()
    return project, key


def key_digest(settings: Settings, authorization: str | None) -> str:
    """The stored form of the bearer key in `authorization`; Unauthorized if there is none."""
    if not authorization:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
            "(create one with `rft keys create --project NAME`)."
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return hash_key(key.strip(), settings.secret_key)


def subject_of(session: Session, digest: str) -> AuthSubject:
    api_key = repository.active_key_by_hash(session, digest)
    if api_key is None:
        raise Unauthorized("Incorrect API key provided.")
    return AuthSubject(project_id=api_key.project_id, key_id=api_key.id)


def authenticate(session: Session, settings: Settings, authorization: str | None) -> AuthSubject:
    return subject_of(session, key_digest(settings, authorization))


class KeyCache:
    """Keys that authenticated in the last `ttl` seconds, by digest, so that a client polling a job
    costs one transaction per request, not two (issue 13's status-polling benchmark).

    Only valid keys are kept, so a new key works at once and wrong guesses fill nothing. The price is
    that a revoked key keeps working in a process for at most `ttl` seconds after the revoking
    commit (`RFT_AUTH_CACHE_SECONDS`; 0 turns the cache off).
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, AuthSubject]] = {}

    def get(self, digest: str) -> AuthSubject | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, subject: AuthSubject) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:  # the oldest insertion goes first
            self._entries.pop(next(iter(self._entries)), None)
        self._entries[digest] = (time.monotonic() + self.ttl, subject)


def readable(model: type[Any], subject: AuthSubject, *, shared: bool = False) -> Select[Any]:
    """`SELECT model` limited to rows of the caller's project: other projects' rows do not exist.

    `shared=True` adds the rows another project granted the caller (checkpoints, through
    `checkpoint_permissions`): for using them (training from one, chatting with it, listing it among the
    models), never for managing them, which stays with the owner."""
    owned = model.project_id == subject.project_id
    if not shared:
        return select(model).where(owned)
    if model is not Checkpoint:
        raise TypeError(f"{model.__name__} rows are never shared")
    granted = select(CheckpointPermission.checkpoint_id).where(
        CheckpointPermission.granted_project_id == subject.project_id
    )
    return select(model).where(or_(owned, model.id.in_(granted)))
