from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from service.checkpoints import service
from service.checkpoints.schemas import (
    ModelDeleted,
    PermissionCreate,
    PermissionDeleted,
    PermissionList,
    PermissionObject,
)
from service.core.http import SessionDep, StorageDep, SubjectDep
from service.core.pagination import list_body

# A checkpoint's name is `ft:<base>:...`, and a base may be a hub id or a folder: it can hold slashes.
router = APIRouter(tags=["checkpoints"])
PERMISSIONS = "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint:path}/permissions"


@router.post(PERMISSIONS, response_model=PermissionList)
def create_permissions(
    fine_tuned_model_checkpoint: str, body: PermissionCreate, session: SessionDep, subject: SubjectDep
) -> dict[str, object]:
    """Share one of the project's checkpoints with other projects: they may train from it and chat with it."""
    rows = service.grant(session, subject, fine_tuned_model_checkpoint, body.project_ids)
    return list_body([PermissionObject.of(r).model_dump() for r in rows], False)


@router.get(PERMISSIONS, response_model=PermissionList)
def list_permissions(
    fine_tuned_model_checkpoint: str,
    session: SessionDep,
    subject: SubjectDep,
    project_id: Annotated[str | None, Query(max_length=64)] = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    order: Literal["ascending", "descending"] = "descending",
) -> dict[str, object]:
    """List a checkpoint's permissions, newest first by default (its owner only)."""
    rows, has_more = service.list_permissions(
        session, subject, fine_tuned_model_checkpoint, project_id=project_id, after=after, limit=limit, order=order
    )
    return list_body([PermissionObject.of(r).model_dump() for r in rows], has_more)


@router.delete(PERMISSIONS + "/{permission_id}", response_model=PermissionDeleted)
def delete_permission(
    fine_tuned_model_checkpoint: str, permission_id: str, session: SessionDep, subject: SubjectDep
) -> PermissionDeleted:
    """Revoke a permission: the project loses the checkpoint at its next request."""
    service.revoke(session, subject, fine_tuned_model_checkpoint, permission_id)
    return PermissionDeleted(id=permission_id)


@router.delete("/v1/models/{model:path}", response_model=ModelDeleted)
def delete_model(model: str, session: SessionDep, subject: SubjectDep, storage: StorageDep) -> ModelDeleted:
    """Delete a fine-tuned model (or one checkpoint) of the project: its rows, permissions and stored bytes."""
    service.delete_model(session, storage, subject, model)
    return ModelDeleted(id=model)
