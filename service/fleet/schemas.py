"""Shapes of `/v1/workers` (an operator's view; not part of OpenAI's API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class WorkerObject(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["worker"] = "worker"
    id: str
    hostname: str
    queues: list[str]
    device_type: str
    device_count: int
    device_memory_bytes: int
    engines: list[str]
    current_job_id: str | None
    started_at: float
    heartbeat_at: float
    healthy: bool = False  # its last heartbeat is recent; a worker whose host died stays listed, unhealthy


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerObject]
