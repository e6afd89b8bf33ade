from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.core.downloads import stored_response
from service.core.http import SessionDep, SettingsDep, StorageDep, SubjectDep, request_transaction
from service.core.limits import limits_for
from service.core.pagination import list_body
from service.files import repository, service
from service.files.schemas import UPLOAD_REQUEST_BODY, FileDeleted, FileList, FileObject
from service.files.upload import MULTIPART_OVERHEAD, receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject, openapi_extra={"requestBody": UPLOAD_REQUEST_BODY})
async def upload_file(request: Request, subject: SubjectDep, settings: SettingsDep, storage: StorageDep) -> FileObject:
    """Upload a JSONL file (multipart fields `file` and `purpose=fine-tune`)."""
    limits = await run_in_threadpool(limits_for, settings, subject.project_id, lambda: request_transaction(request))
    declared = request.headers.get("content-length", "")

    def check_room() -> None:  # before the body is read: a full project's upload is refused at once
        with request_transaction(request) as session:
            body = int(declared) - MULTIPART_OVERHEAD if declared.isdigit() else 0
            service.check_room(session, subject, limits, max(0, body))

    await run_in_threadpool(check_room)
    file_id, key = service.new_file_key(subject)
    out = await run_in_threadpool(storage.writer, key)
    upload = await receive_upload(request, out, settings.max_upload_bytes)

    def record() -> FileObject:
        with request_transaction(request) as session:
            row = service.record_upload(session, storage, subject, limits, (file_id, key, out), upload)
            return FileObject.of(row)

    return await run_in_threadpool(record)


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    subject: SubjectDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, object]:
    """List the project's files, newest first by default."""
    rows, has_more = repository.page(session, subject, purpose=purpose, after=after, limit=limit, order=order)
    return list_body([FileObject.of(r).model_dump() for r in rows], has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, subject: SubjectDep) -> FileObject:
    """Retrieve a file's metadata."""
    return FileObject.of(service.get_file(session, subject, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, subject: SubjectDep, storage: StorageDep) -> FileDeleted:
    """Delete a file and its bytes."""
    service.delete_file(session, storage, subject, file_id)
    return FileDeleted(id=file_id)


CONTENT_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {"application/octet-stream": {}, "text/csv": {}},
        "description": "The file's bytes as uploaded (a job's results file: its CSV).",
    }
}


@router.get("/{file_id}/content", response_class=StreamingResponse, responses=CONTENT_RESPONSES)
def file_content(
    file_id: str, request: Request, session: SessionDep, subject: SubjectDep, storage: StorageDep
) -> Response:
    """Download a file's raw bytes; supports Range and carries its sha256."""
    row = service.get_file(session, subject, file_id)
    csv = row.filename.endswith(".csv")  # a job's results file
    return stored_response(
        request,
        storage,
        row.storage_key,
        size=row.bytes,
        sha256=row.sha256,
        filename=f"{row.id}.csv" if csv else f"{row.id}.jsonl",
        media_type="text/csv" if csv else "application/octet-stream",
        headers={"X-Content-SHA256": row.sha256},
    )
