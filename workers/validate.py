"""File validation for a job: every line of both files checked before the job may queue."""

from __future__ import annotations

import time
from typing import Any

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import now
from service.files.repository import files_of_job
from service.files.validation import FileReport, validate_jsonl
from service.fleet import service as fleet
from service.jobs import repository
from service.jobs.outcomes import status_changed
from workers.lease import claim, worker_identity


def validate_job(job_id: str, settings: Settings) -> None:
    with unit_of_work(settings) as session:
        if not claim(session, job_id, worker_identity(), settings, "validating_files", "validating_files"):
            return
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        files = {i: (f.filename, f.sha256, f.storage_key) for i, f in files_of_job(session, job).items()}
        training_file, validation_file = job.training_file, job.validation_file
    error, notes = check_files(settings, files, training_file, validation_file)
    with unit_of_work(settings) as session:
        job = repository.get_unscoped(session, job_id)
        assert job is not None
        if error:
            if repository.transition(
                session,
                job_id,
                ["validating_files"],
                status="failed",
                error=error,
                finished_at=now(),
                **repository.RELEASE_LEASE,
            ):
                repository.add_event(session, job, error["message"], level="error")
                status_changed(session, storage_for(settings), job, "failed")
            return
        if repository.transition(
            session, job_id, ["validating_files"], status="queued", enqueued_at=time.time(), **repository.RELEASE_LEASE
        ):
            for level, message in notes:
                repository.add_event(session, job, message, level=level)
            repository.add_event(session, job, "Files validated; the job is queued for training.")
            fleet.wake(session, settings, job_id)


def check_files(
    settings: Settings, files: dict[str, tuple[str, str, str]], training_file: str, validation_file: str | None
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Validate the job's files; return (error for the job or None, events to add)."""
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
