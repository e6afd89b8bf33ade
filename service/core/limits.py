"""Limits per project: the defaults in `Settings` with the project's overrides applied, and the
checks that refuse work past them with the limit, its setting and the current use in the message.

A check counts and then the caller writes, in the same transaction: SQLite serializes writers
(BEGIN IMMEDIATE), so the count cannot go stale there; on PostgreSQL two requests racing at the
edge can each pass and overshoot a count by one. Limits are a fairness guard, not a ledger.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.errors import QuotaExceeded
from service.core.settings import Settings
from service.core.tables import Project


@dataclass(frozen=True)
class Limits:
    max_running_jobs: int
    max_queued_jobs: int
    max_files: int
    max_stored_bytes: int
    requests_per_second: float
    request_burst: int


_names: dict[tuple[str, str], str | None] = {}  # (database url, project id) -> name; both never change
_names_lock = threading.Lock()


def limits_for(
    settings: Settings, project_id: str, transaction: Callable[[], AbstractContextManager[Session]]
) -> Limits:
    """The project's limits. Overrides are keyed by project id or name; a name is looked up once
    per process (one short query) and only when some override is keyed by a name."""
    limits = Limits(
        max_running_jobs=settings.max_running_jobs,
        max_queued_jobs=settings.max_queued_jobs,
        max_files=settings.max_files,
        max_stored_bytes=settings.max_stored_bytes,
        requests_per_second=settings.requests_per_second,
        request_burst=settings.request_burst,
    )
    overrides = settings.project_limits
    if not overrides:
        return limits
    entry = overrides.get(project_id)
    if entry is None:
        entry = overrides.get(_project_name(settings, project_id, transaction) or "")
    if entry is None:
        return limits
    return replace(limits, **entry.model_dump(exclude_none=True))


def _project_name(
    settings: Settings, project_id: str, transaction: Callable[[], AbstractContextManager[Session]]
) -> str | None:
    key = (settings.sqlalchemy_url, project_id)
    with _names_lock:
        if key in _names:
            return _names[key]
    with transaction() as session:
        name = session.scalar(select(Project.name).where(Project.id == project_id))
    with _names_lock:
        _names[key] = name
    return name


def check_files(limits: Limits, project_id: str, files: int, stored: int, adding: int, param: str = "file") -> None:
    """Refuse one more file of `adding` bytes for a project holding `files` files of `stored` bytes."""
    if files + 1 > limits.max_files:
        raise QuotaExceeded(
            f"Project {project_id} holds {files} files, its limit (max_files): {limits.max_files}. "
            "Delete files it no longer needs (DELETE /v1/files/{file_id}) or ask the operator to raise the limit.",
            param=param,
        )
    if stored + adding > limits.max_stored_bytes:
        raise QuotaExceeded(
            f"Project {project_id} stores {stored} bytes in files; {adding} more would pass its limit "
            f"(max_stored_bytes): {limits.max_stored_bytes}. Delete files it no longer needs or ask the "
            "operator to raise the limit.",
            param=param,
        )


def check_queued_jobs(limits: Limits, project_id: str, waiting: int) -> None:
    """Refuse one more waiting job for a project that has `waiting` validating or queued jobs."""
    if waiting + 1 > limits.max_queued_jobs:
        raise QuotaExceeded(
            f"Project {project_id} has {waiting} jobs validating or queued, its limit (max_queued_jobs): "
            f"{limits.max_queued_jobs}. Wait for one to start or cancel one.",
        )
