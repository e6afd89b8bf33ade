from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from service.core.http import SessionDep, SubjectDep
from service.core.pagination import list_body
from service.jobs import repository, service
from service.jobs.schemas import CheckpointList, CheckpointObject, EventList, EventObject, JobCreate, JobList, JobObject

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=JobObject)
def create_job(
    body: JobCreate,
    session: SessionDep,
    subject: SubjectDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JobObject:
    """Create a reinforcement fine-tuning job; its files are validated before it is queued."""
    return service.job_object(service.create_job(session, subject, body, idempotency_key))


@router.get("", response_model=JobList)
def list_jobs(
    request: Request, session: SessionDep, subject: SubjectDep, after: str | None = None, limit: Limit = 20
) -> dict[str, object]:
    """List the project's fine-tuning jobs, newest first; filter with `metadata[key]=value`."""
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    rows, has_more = repository.page_jobs(session, subject, after=after, limit=limit, metadata=metadata)
    return list_body([service.job_object(j).model_dump() for j in rows], has_more, with_ids=False)


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(job_id: str, session: SessionDep, subject: SubjectDep) -> JobObject:
    """Retrieve a fine-tuning job."""
    return service.job_object(service.get_job(session, subject, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, session: SessionDep, subject: SubjectDep) -> JobObject:
    """Cancel a job; a running job stops after its current training step."""
    return service.job_object(service.cancel_job(session, subject, job_id))


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(job_id: str, session: SessionDep, subject: SubjectDep) -> JobObject:
    """Pause a job; a running job writes a checkpoint first."""
    return service.job_object(service.pause_job(session, subject, job_id))


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(job_id: str, session: SessionDep, subject: SubjectDep) -> JobObject:
    """Resume a paused job from its pause checkpoint."""
    return service.job_object(service.resume_job(session, subject, job_id))


@router.get("/{job_id}/events", response_model=EventList)
def list_events(
    job_id: str, session: SessionDep, subject: SubjectDep, after: str | None = None, limit: Limit = 20
) -> dict[str, object]:
    """List a job's events, newest first."""
    service.get_job(session, subject, job_id)
    rows, has_more = repository.page_events(session, subject, job_id, after=after, limit=limit)
    data = [EventObject.model_validate(e, from_attributes=True).model_dump() for e in rows]
    return list_body(data, has_more, with_ids=False)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str, session: SessionDep, subject: SubjectDep, after: str | None = None, limit: Limit = 10
) -> dict[str, object]:
    """List a job's checkpoints, newest first."""
    service.get_job(session, subject, job_id)
    rows, has_more = repository.page_checkpoints(session, subject, job_id, after=after, limit=limit)
    data = [
        CheckpointObject(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
            step_number=c.step_number,
            metrics=c.metrics,
            fine_tuning_job_id=c.job_id,
        ).model_dump()
        for c in rows
    ]
    return list_body(data, has_more)
