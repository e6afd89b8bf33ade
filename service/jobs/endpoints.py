from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from service.auth.service import AuthSubject
from service.core.downloads import stored_response
from service.core.errors import NotFound
from service.core.http import SessionDep, SettingsDep, StorageDep, SubjectDep, request_transaction
from service.core.pagination import list_body
from service.core.settings import Settings
from service.core.storage import Storage
from service.core.tables import Checkpoint
from service.jobs import preflight, repository, service
from service.jobs.schemas import (
    CheckpointList,
    CheckpointObject,
    EventList,
    EventObject,
    JobCreate,
    JobDeleted,
    JobList,
    JobObject,
    Preflight,
    ResumeBody,
)
from service.models.archive import archive_of

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=JobObject)
def create_job(
    body: JobCreate,
    session: SessionDep,
    subject: SubjectDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JobObject:
    """Create a reinforcement fine-tuning job; its files are validated before it is queued."""
    return service.job_object(service.create_job(session, subject, body, idempotency_key, settings))


@router.post("/preflight", response_model=Preflight)
def preflight_job(
    body: JobCreate, session: SessionDep, subject: SubjectDep, settings: SettingsDep, storage: StorageDep
) -> Preflight:
    """Ours: check a job request as creation would, validate its files, and answer its resolved
    hyperparameters, steps, tokens and a time estimate, without creating the job."""
    return preflight.preflight(session, subject, body, settings, storage)


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
async def retrieve_job(job_id: str, request: Request, subject: SubjectDep) -> Response:
    """Retrieve a fine-tuning job."""
    # What clients poll: one thread hop for the whole read, and the model serialised once (FastAPI
    # would validate it again against response_model). bench/status_poll_bench.py measures it.
    body = await run_in_threadpool(_job_json, request, subject, job_id)
    return Response(body, media_type="application/json")


def _job_json(request: Request, subject: AuthSubject, job_id: str) -> bytes:
    for attempt in (1, 2):
        try:
            with request_transaction(request) as session:
                bind = session.get_bind()
                if isinstance(bind, Engine) and bind.dialect.name == "postgresql":  # one SELECT, no BEGIN/COMMIT
                    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                return service.job_object(service.get_job(session, subject, job_id)).model_dump_json().encode()
        except DBAPIError as error:
            # A pooled connection the database dropped (a restart within the pool's ping window,
            # core/db.py): the pool is invalidated by now, and a read is safe to run again.
            if not error.connection_invalidated or attempt == 2:
                raise
    raise AssertionError("unreachable")


@router.delete("/{job_id}", response_model=JobDeleted)
def delete_job(job_id: str, session: SessionDep, subject: SubjectDep, storage: StorageDep) -> JobDeleted:
    """Delete a succeeded, failed or cancelled job with its events, metrics, checkpoints and their files."""
    service.delete_job(session, storage, subject, job_id)
    return JobDeleted(id=job_id)


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, session: SessionDep, subject: SubjectDep, storage: StorageDep) -> JobObject:
    """Cancel a job; a running job stops after its current training step."""
    return service.job_object(service.cancel_job(session, storage, subject, job_id))


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(job_id: str, session: SessionDep, subject: SubjectDep, storage: StorageDep) -> JobObject:
    """Pause a job; a running job writes a checkpoint first."""
    return service.job_object(service.pause_job(session, storage, subject, job_id))


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(
    job_id: str, session: SessionDep, subject: SubjectDep, settings: SettingsDep, body: ResumeBody | None = None
) -> JobObject:
    """Resume a paused job from its pause checkpoint; the optional body raises or removes its budget caps."""
    caps = body.model_dump(exclude_unset=True) if body is not None else None
    return service.job_object(service.resume_job(session, subject, job_id, settings, caps))


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


ARCHIVE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/x-tar": {}}, "description": "A tar of a Hugging Face model directory."},
    206: {"description": "The requested byte range of that tar."},
}
Merged = Annotated[bool, Query(description="Merge a LoRA adapter into full weights.")]


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content", response_class=StreamingResponse, responses=ARCHIVE_RESPONSES
)
def download_checkpoint(
    job_id: str,
    checkpoint_id: str,
    request: Request,
    subject: SubjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    merged: Merged = False,
) -> Response:
    """Download a checkpoint as a tar of its Hugging Face directory; supports Range and carries its sha256."""
    with request_transaction(request) as session:  # not held while an archive is built
        ckpt = service.get_checkpoint(session, subject, job_id, checkpoint_id)
    return _archive_response(request, ckpt, settings, storage, merged)


@router.get("/{job_id}/content", response_class=StreamingResponse, responses=ARCHIVE_RESPONSES)
def download_model(
    job_id: str,
    request: Request,
    subject: SubjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    merged: Merged = False,
) -> Response:
    """Download the job's fine-tuned model (its chosen checkpoint) as a tar of a Hugging Face directory."""
    with request_transaction(request) as session:
        ckpt = service.final_checkpoint(session, subject, job_id)
    return _archive_response(request, ckpt, settings, storage, merged)


def _archive_response(
    request: Request, ckpt: Checkpoint, settings: Settings, storage: Storage, merged: bool
) -> Response:
    name = f"{ckpt.job_id}-step-{ckpt.step_number}"
    try:
        archive = archive_of(storage, ckpt.storage_key, settings, merged=merged, name=name, owner=ckpt.project_id)
    except FileNotFoundError as exc:  # pruned between the lookup and the build
        raise NotFound(f"Checkpoint {ckpt.id} was removed.", param="checkpoint_id") from exc
    return stored_response(
        request,
        storage,
        archive.key,
        size=archive.size,
        sha256=archive.sha256,
        filename=archive.filename,
        media_type="application/x-tar",
        headers={"X-Checksum-SHA256": archive.sha256},
    )
