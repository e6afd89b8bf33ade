"""Files: store uploads, list, read and delete them. RFT content rules run when a job starts."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.core.db import on_commit
from service.core.errors import InvalidRequest, NotFound
from service.core.ids import new_id
from service.core.limits import Limits, check_files
from service.core.settings import Settings
from service.core.storage import Storage, Writer, storage_for
from service.core.tables import File, now
from service.files import repository
from service.files.upload import Upload
from service.files.validation import FileReport, validate_jsonl

PURPOSES = ("fine-tune",)
MAX_FILENAME = 512  # the files.filename column
FORM_FIELDS = {"purpose", "expires_after[anchor]", "expires_after[seconds]"}
MIN_EXPIRY, MAX_EXPIRY = 3600, 30 * 24 * 3600  # OpenAI's bounds on expires_after[seconds]
EXPIRE_BATCH = 500


def new_file_key(subject: AuthSubject) -> tuple[str, str]:
    file_id = new_id("file-")
    return file_id, f"files/{subject.project_id}/{file_id}"


def check_upload(upload: Upload) -> None:
    unknown = sorted(set(upload.fields) - FORM_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    purpose = upload.fields.get("purpose")
    if not purpose:
        raise InvalidRequest("Missing required parameter: 'purpose' (use 'fine-tune').", param="purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}: this server accepts {', '.join(PURPOSES)}.", param="purpose"
        )
    expires_in(upload.fields)
    filename = upload.filename or ""
    if len(filename) > MAX_FILENAME or "\x00" in filename:
        raise InvalidRequest(
            f"Invalid file name of {len(filename)} characters: it must be at most {MAX_FILENAME}, without NUL.",
            param="file",
        )
    if not filename.lower().endswith(".jsonl"):
        raise InvalidRequest(
            f"Invalid file {filename!r}: fine-tuning files must be JSONL with a .jsonl extension.", param="file"
        )
    if upload.bytes == 0:
        raise InvalidRequest(f"File {filename!r} is empty: it needs at least one JSONL example.", param="file")


def check_room(session: Session, subject: AuthSubject, limits: Limits, adding: int) -> None:
    """Refuse an upload of `adding` bytes that would take the project past its files or bytes limit."""
    files, stored = repository.usage(session, subject.project_id)
    check_files(limits, subject.project_id, files, stored, adding)


def expires_in(fields: dict[str, str]) -> int | None:
    """OpenAI's optional `expires_after[anchor]` / `expires_after[seconds]`: the seconds after creation
    the file expires (the expirer then deletes it), or None where the form asks for no expiry."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(
            f"expires_after[anchor] must be 'created_at' (the only anchor), got {anchor!r}.",
            param="expires_after[anchor]",
        )
    value = int(seconds) if seconds is not None and seconds.strip().isdigit() else None
    if value is None or not MIN_EXPIRY <= value <= MAX_EXPIRY:
        raise InvalidRequest(
            f"expires_after[seconds] must be a whole number of seconds from {MIN_EXPIRY} (1 hour) to "
            f"{MAX_EXPIRY} (30 days), got {seconds!r}.",
            param="expires_after[seconds]",
        )
    return value


def record_upload(
    session: Session,
    storage: Storage,
    subject: AuthSubject,
    limits: Limits,
    staged: tuple[str, str, Writer],
    upload: Upload,
) -> File:
    """Validate the form, check the project's room, commit the streamed bytes and add the row
    (the bytes are removed again on error)."""
    file_id, key, out = staged
    try:
        check_upload(upload)
        check_room(session, subject, limits, upload.bytes)
        out.commit()
        created = now()
        lifetime = expires_in(upload.fields)
        row = File(
            id=file_id,
            project_id=subject.project_id,
            filename=upload.filename or "",
            purpose=upload.fields["purpose"],
            bytes=upload.bytes,
            sha256=upload.sha256,
            status="processed",
            storage_key=key,
            created_at=created,
            expires_at=None if lifetime is None else created + lifetime,
        )
        session.add(row)
        session.flush()
        return row
    except BaseException:
        out.abort()
        storage.delete(key)
        raise


def record_generated(session: Session, project_id: str, key: str, filename: str, purpose: str, content: bytes) -> File:
    """The row of a file this server made for the project (a job's results), its bytes already stored under `key`."""
    row = File(
        id=new_id("file-"),
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        status="processed",
        storage_key=key,
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, subject: AuthSubject, file_id: str) -> File:
    row = repository.get(session, subject, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return row


def delete_file(session: Session, storage: Storage, subject: AuthSubject, file_id: str) -> None:
    row = get_file(session, subject, file_id)
    session.delete(row)
    session.flush()
    # The bytes go only once the row is gone for good; a failed commit keeps both.
    on_commit(session, lambda: storage.delete(row.storage_key))


def expire(session: Session, storage: Storage) -> int:
    """Delete (rows now, bytes once that commits) files past their `expires_at`; how many. The
    expirer task runs this every `RFT_FILE_EXPIRY_INTERVAL_SECONDS` on the light worker with `--beat`."""
    rows = repository.expired(session, EXPIRE_BATCH)
    for row in rows:
        session.delete(row)
    session.flush()
    keys = [row.storage_key for row in rows]

    def remove_bytes() -> None:  # only once the rows are gone for good
        for key in keys:
            storage.delete(key)

    if keys:
        on_commit(session, remove_bytes)
    return len(rows)


def check_job_files(
    settings: Settings, files: dict[str, tuple[str, str, str]], training_file: str, validation_file: str | None
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Validate a job's files line by line (its validating stage, and the pre-flight): the error the job
    fails with or None, and the events to add. `files` maps each file id to (filename, sha256, storage key)."""
    storage = storage_for(settings)
    notes: list[tuple[str, str]] = []
    reports: dict[str, FileReport] = {}
    checks = [("training_file", training_file, settings.max_training_lines)]
    if validation_file:
        checks.append(("validation_file", validation_file, settings.max_validation_lines))
    for param, file_id, max_lines in checks:
        if file_id not in files or not storage.exists(files[file_id][2]):
            return _error(
                param, f"{param} {file_id} expired or was deleted after the job was created; upload it again."
            ), notes
        filename, _, key = files[file_id]
        report = validate_jsonl(storage.iter_bytes(key), max_line_bytes=settings.max_line_bytes, max_lines=max_lines)
        if report.error_count:
            return _error(
                param,
                f"{param} {file_id} ({filename}) is not valid RFT JSONL: {report.error_count} "
                f"invalid line(s) of {report.lines}. {report.summary()}.",
            ), notes
        reports[param] = report
        notes.append(("info", f"{param} {file_id} ({filename}): {report.examples} examples."))
    if validation_file:
        if training_file == validation_file or files[training_file][1] == files[validation_file][1]:
            return _error(
                "validation_file",
                f"validation_file {validation_file} has exactly the same content as "
                f"training_file {training_file}; hold out different examples so validation reward "
                "measures generalisation, not memorisation.",
            ), notes
        train, valid = reports["training_file"].line_hashes, reports["validation_file"].line_hashes
        shared = sorted(line for digest, line in valid.items() if digest in train)
        if shared:
            notes.append(
                (
                    "warn",
                    f"{len(shared)} of {len(valid)} validation examples also appear in the training "
                    f"file (validation lines {', '.join(map(str, shared[:10]))}); validation reward will "
                    "overstate generalisation.",
                )
            )
    return None, notes


def _error(param: str, message: str) -> dict[str, Any]:
    return {"code": f"invalid_{param}", "message": message, "param": param}
