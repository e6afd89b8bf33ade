"""Shapes of `/v1/fine_tuning/checkpoints/{checkpoint}/permissions` and `DELETE /v1/models/{model}`,
as OpenAI's SDK sends and reads them (openai/types/fine_tuning/checkpoints/)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.tables import CheckpointPermission

ProjectId = Annotated[str, Field(min_length=1, max_length=64)]


class PermissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project_ids: Annotated[list[ProjectId], Field(min_length=1, max_length=100)]


class PermissionObject(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str  # the project granted the checkpoint

    @classmethod
    def of(cls, row: CheckpointPermission) -> PermissionObject:
        return cls(id=row.id, created_at=row.created_at, project_id=row.granted_project_id)


class PermissionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PermissionObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class PermissionDeleted(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool = True


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
