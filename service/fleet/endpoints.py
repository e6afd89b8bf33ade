from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header

from service.core.errors import NotFound, Unauthorized
from service.core.http import SessionDep, SettingsDep
from service.core.observability import admin_allowed
from service.fleet import repository
from service.fleet.schemas import WorkerList, WorkerObject
from service.fleet.service import LIVE_HEARTBEATS

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=WorkerList)
def list_workers(
    session: SessionDep, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> WorkerList:
    """The fleet: every worker that reported itself, its capabilities, health and current job (admin key)."""
    if not settings.admin_key:
        raise NotFound("The fleet view is off: set RFT_ADMIN_KEY and call /v1/workers with it as a bearer token.")
    if not admin_allowed(settings, authorization):
        raise Unauthorized("/v1/workers needs RFT_ADMIN_KEY as a bearer token, not a project's API key.")
    since = time.time() - LIVE_HEARTBEATS * settings.heartbeat_seconds
    data = [
        WorkerObject.model_validate(w).model_copy(update={"healthy": w.heartbeat_at >= since})
        for w in repository.all_workers(session)
    ]
    return WorkerList(data=data)
