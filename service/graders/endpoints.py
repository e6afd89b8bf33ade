from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.core.http import SettingsDep, SubjectDep
from service.graders import service
from service.graders.schemas import GraderEnvironmentObject, RunRequest, ValidateRequest

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])


@router.post("/validate")
def validate_grader(body: ValidateRequest, _: SubjectDep) -> dict[str, Any]:
    """Validate a grader config; a 400 names the first bad field."""
    return {"grader": service.validate(body.grader).model_dump(exclude_none=True)}


@router.post("/run")
def run_grader(body: RunRequest, subject: SubjectDep, settings: SettingsDep) -> dict[str, Any]:
    """Grade one model sample against one item and report the reward, sub-rewards and errors."""
    return service.run(body.grader, body.model_sample, body.item, settings, subject.project_id)


@router.get("/environment", response_model=GraderEnvironmentObject)
def grader_environment(_: SubjectDep, settings: SettingsDep) -> GraderEnvironmentObject:
    """The packages python graders can import (with versions), the sandbox's limits, and whether it runs here."""
    return service.environment(settings)
