"""Fine-tuning jobs: creation, the status machine seen from the API, and the job object.

Statuses: validating_files -> queued -> running -> succeeded | failed | cancelled, and
running -> paused -> queued on resume. Cancel and pause of a running job are flags the worker
checks between training steps; everywhere else they apply at once through a conditional UPDATE.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.core.db import on_commit
from service.core.errors import Conflict, InvalidRequest, InvalidTransition, NotFound
from service.core.ids import new_id
from service.core.limits import check_queued_jobs, limits_for
from service.core.queue import wake_validation
from service.core.settings import Settings
from service.core.storage import Storage, job_folder
from service.core.tables import Checkpoint, Job, Worker, now
from service.files import repository as files
from service.files.service import delete_file
from service.fleet import service as fleet
from service.fleet.service import describe, devices_asked, live_training_workers, refuse_if_no_worker_can_run
from service.graders.schemas import parse_grader
from service.graders.service import require_runnable
from service.jobs import budget, repository
from service.jobs.integrations import TRACKER_NAMES, check_integrations, stored
from service.jobs.outcomes import TERMINAL, status_changed
from service.jobs.schemas import JobCreate, JobError, JobObject, RftHyperparameters, samples_per_prompt
from service.models import thinking
from service.models.constraints import from_response_format
from service.models.engines import choose_engine
from service.models.memory_plan import Estimate, refuse_if_too_large
from service.models.registry import forget_loaded
from service.models.repository import checkpoint_named
from service.models.service import refuse_if_in_use, training_base

EFFORT_PARAM = "method.reinforcement.hyperparameters.reasoning_effort"
CANCELLABLE_AT_ONCE = ("validating_files", "queued", "paused")


def get_job(session: Session, subject: AuthSubject, job_id: str) -> Job:
    job = repository.get(session, subject, job_id)
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def get_checkpoint(session: Session, subject: AuthSubject, job_id: str, checkpoint_id: str) -> Checkpoint:
    get_job(session, subject, job_id)
    ckpt = repository.get_checkpoint(session, subject, job_id, checkpoint_id)
    if ckpt is None:
        raise NotFound(f"No such checkpoint of job {job_id}: {checkpoint_id}", param="checkpoint_id")
    return ckpt


def final_checkpoint(session: Session, subject: AuthSubject, job_id: str) -> Checkpoint:
    """The checkpoint the job chose as its fine-tuned model."""
    job = get_job(session, subject, job_id)
    ckpt = checkpoint_named(session, job.project_id, job.fine_tuned_model) if job.fine_tuned_model else None
    if ckpt is None:
        raise NotFound(
            f"Job {job_id} has no downloadable fine-tuned model (status {job.status!r}); "
            f"list its checkpoints with GET /v1/fine_tuning/jobs/{job_id}/checkpoints.",
            param="fine_tuning_job_id",
        )
    return ckpt


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_method(body: JobCreate) -> None:
    if body.method is None:
        raise InvalidRequest(
            "Missing 'method': this server runs reinforcement fine-tuning; send "
            "method={'type': 'reinforcement', 'reinforcement': {'grader': {...}, 'hyperparameters': {...}}} "
            "(hyperparameters, top-level in OpenAI's deprecated form, go there too).",
            param="method",
        )
    if body.method.type != "reinforcement":
        raise InvalidRequest(
            f"method.type {body.method.type!r} is not supported by this server yet; use 'reinforcement'.",
            param="method.type",
        )
    if body.method.reinforcement is None:
        raise InvalidRequest(
            "method.reinforcement is required when method.type is 'reinforcement' (it holds the grader).",
            param="method.reinforcement",
        )


def _check_devices(devices: int | None, engine: str, settings: Settings) -> None:
    if devices and devices > 1 and "vllm" in (engine, settings.rollout_engine):
        raise InvalidRequest(
            f"n_devices {devices} with the vllm rollout engine: a job on several devices samples with the torch "
            "engine for now. Set rollout_engine to 'torch' or 'auto', or n_devices to 1.",
            param="method.reinforcement.hyperparameters.n_devices",
        )


def move_deprecated_hyperparameters(body: JobCreate) -> None:
    """OpenAI's deprecated top-level `hyperparameters` into method.reinforcement.hyperparameters, as
    OpenAI moves them into the method; a value given in both places must agree."""
    top = body.hyperparameters
    if top is None:
        return
    assert body.method is not None and body.method.reinforcement is not None
    rft = body.method.reinforcement.hyperparameters
    unknown = sorted(top.model_extra or {})
    if unknown:
        key = unknown[0]
        raise InvalidRequest(
            f"hyperparameters.{key} is not one of the deprecated top-level hyperparameters (n_epochs, batch_size, "
            f"learning_rate_multiplier); put it in method.reinforcement.hyperparameters.{key}.",
            param=f"hyperparameters.{key}",
        )
    for key in sorted(top.model_fields_set):
        value = getattr(top, key)
        if key in rft.model_fields_set and getattr(rft, key) != value:
            raise InvalidRequest(
                f"hyperparameters.{key} is {value!r} but method.reinforcement.hyperparameters.{key} is "
                f"{getattr(rft, key)!r}; give it once, in method.reinforcement.hyperparameters (the top-level "
                "hyperparameters are deprecated).",
                param=f"hyperparameters.{key}",
            )
        setattr(rft, key, value)


def _check_file(session: Session, subject: AuthSubject, file_id: str, param: str) -> None:
    row = files.get(session, subject, file_id)
    if row is None:
        raise InvalidRequest(f"{param} {file_id!r} does not exist in this project.", param=param)
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{param} {file_id!r} has purpose {row.purpose!r}; expected 'fine-tune'.", param=param)


@dataclass(frozen=True)
class Checked:
    """What `check_request` found of a job request that passed: the pre-flight answers from it."""

    grader: Any
    engine: str
    group_size: int
    fleet: list[Worker]
    plan: Estimate | None


def check_request(session: Session, subject: AuthSubject, body: JobCreate, settings: Settings) -> Checked:
    """Every check job creation makes of the request before anything is stored: method, grader,
    model and its memory plan against the fleet, the files, the integrations."""
    _check_method(body)
    move_deprecated_hyperparameters(body)
    assert body.method is not None and body.method.reinforcement is not None
    grader = parse_grader(body.method.reinforcement.grader, "method.reinforcement.grader")
    # a schema llguidance cannot compile is a 400 now, not a failed job later
    from_response_format(body.method.reinforcement.response_format, "method.reinforcement.response_format")
    hyperparameters = body.method.reinforcement.hyperparameters
    engine, group_size, fleet, plan = _check_model(session, subject, body.model, hyperparameters, settings)
    require_runnable(grader, settings, "method.reinforcement.grader")
    _check_file(session, subject, body.training_file, "training_file")
    if body.validation_file:
        _check_file(session, subject, body.validation_file, "validation_file")
    check_integrations(body.integrations or [], settings, fleet)
    return Checked(grader, engine, group_size, fleet, plan)


def create_job(
    session: Session, subject: AuthSubject, body: JobCreate, idempotency_key: str | None, settings: Settings
) -> Job:
    request_hash = _request_hash(body)
    if idempotency_key:
        existing = repository.by_idempotency_key(session, subject, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash, idempotency_key)
    checked = check_request(session, subject, body, settings)
    assert body.method is not None and body.method.reinforcement is not None
    hyperparameters = body.method.reinforcement.hyperparameters
    plan = checked.plan
    needs_engine = hyperparameters.rollout_engine if hyperparameters.rollout_engine == "vllm" else None
    needs_memory = plan.peak if plan is not None else None
    _check_room(session, subject, settings)
    job = Job(
        id=new_id("ftjob-"),
        project_id=subject.project_id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        integrations=stored(body.integrations),
        method={"type": "reinforcement", "reinforcement": body.method.reinforcement.model_dump(mode="json")},
        status="validating_files",
        result_files=[],
        enqueued_at=time.time(),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        needs_memory_bytes=needs_memory,
        needs_engine=needs_engine,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        # A concurrent retry with the same Idempotency-Key won the insert: answer with its job.
        winner = repository.by_idempotency_key(session, subject, idempotency_key or "")
        if winner is None:
            raise
        return _replay(winner, request_hash, idempotency_key or "")
    repository.add_event(session, job, f"Created fine-tuning job: {job.id}")
    repository.add_event(session, job, f"Validating training file: {job.training_file}")
    for integration in job.integrations or []:
        repository.add_event(session, job, f"Logging to {TRACKER_NAMES[integration['type']]} once training starts.")
    wake_validation(session, job.id)
    return job


def _check_model(
    session: Session, subject: AuthSubject, model: str, hyperparameters: RftHyperparameters, settings: Settings
) -> tuple[str, int, list[Worker], Estimate | None]:
    """Refuse a model the project cannot train, or that needs more than a worker has; (the engine and
    group size it was planned with, the live fleet, its smallest plan)."""
    spec = training_base(session, subject, model)
    has_switch = thinking.has_switch(spec.name, spec.kind, spec.location)
    thinking.check(model, has_switch, hyperparameters.reasoning_effort, EFFORT_PARAM)
    hp = hyperparameters.model_dump(mode="json")
    devices = devices_asked({"reinforcement": {"hyperparameters": hp}})
    _check_devices(devices, hyperparameters.rollout_engine, settings)
    engine = choose_engine(hyperparameters.rollout_engine, settings, model)
    if devices and devices > 1:
        engine = "torch"  # what a job on several devices samples with (workers/rl/loop.py SEVERAL_DEVICES)
    group_size = samples_per_prompt(hyperparameters.compute_multiplier)
    fleet = live_training_workers(session, settings)
    largest = max((w.device_memory_bytes for w in fleet), default=None)  # the fleet's, where it reports
    location = spec.location or None
    try:
        plan = refuse_if_too_large(spec.name, hp, group_size, engine, settings, location, largest, devices or 1)
    except InvalidRequest as exc:
        if fleet:
            exc.message += f" The live training workers: {'; '.join(describe(w) for w in fleet)}."
        raise
    needs_engine = hyperparameters.rollout_engine if hyperparameters.rollout_engine == "vllm" else None
    plan_text = plan.describe() if plan is not None else ""
    refuse_if_no_worker_can_run(fleet, plan.peak if plan else None, needs_engine, plan_text, devices)
    return engine, group_size, fleet, plan


def _check_room(session: Session, subject: AuthSubject, settings: Settings) -> None:
    limits = limits_for(settings, subject.project_id, lambda: nullcontext(session))
    check_queued_jobs(limits, subject.project_id, repository.count_waiting(session, subject.project_id))


def _replay(job: Job, request_hash: str, key: str) -> Job:
    if job.request_hash != request_hash:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for job {job.id} with a different request body; "
            "use a new key for a new job.",
            param="Idempotency-Key",
        )
    return job


def cancel_job(session: Session, storage: Storage, subject: AuthSubject, job_id: str) -> Job:
    job = get_job(session, subject, job_id)
    if job.status in TERMINAL:
        raise InvalidTransition(
            f"Job {job_id} is already {job.status}; only validating_files, queued, running or paused jobs "
            "can be cancelled.",
            param="fine_tuning_job_id",
        )
    if repository.transition(
        session, job_id, CANCELLABLE_AT_ONCE, status="cancelled", finished_at=now(), **repository.RELEASE_LEASE
    ):
        repository.add_event(session, job, "Fine-tuning job cancelled.")
        status_changed(session, storage, job, "cancelled")  # a paused job that trained has its results file
    elif repository.transition(session, job_id, ["running"], cancel_requested=True):
        repository.add_event(session, job, "Cancellation requested; the job stops after the current training step.")
    return get_job(session, subject, job_id)


def delete_job(session: Session, storage: Storage, subject: AuthSubject, job_id: str) -> None:
    """Delete a finished job: its rows and results file now, its checkpoints', archives' and results
    file's bytes once that commits (not while another job trains from or grades with one of its
    checkpoints: a 409 names it)."""
    job = get_job(session, subject, job_id)
    if job.status not in TERMINAL:
        raise InvalidTransition(
            f"Job {job_id} is {job.status}; only succeeded, failed or cancelled jobs can be deleted (cancel it first).",
            param="fine_tuning_job_id",
        )
    refuse_if_in_use(session, subject, repository.checkpoints_of(session, job.id))
    folder = job_folder(job.project_id, job.id)
    for file_id in job.result_files or []:  # a CSV of the metrics rows that go with the job
        if files.get(session, subject, file_id) is not None:
            delete_file(session, storage, subject, file_id)
    repository.delete(session, job)

    # The bytes go only once the rows are gone for good; a failed commit keeps both.
    def remove_bytes() -> None:
        forget_loaded(storage.local_path(folder))
        storage.delete(folder)

    on_commit(session, remove_bytes)


def pause_job(session: Session, storage: Storage, subject: AuthSubject, job_id: str) -> Job:
    job = get_job(session, subject, job_id)
    if repository.transition(session, job_id, ["queued"], status="paused", **repository.RELEASE_LEASE):
        repository.add_event(session, job, "Fine-tuning job paused before it started training.")
        status_changed(session, storage, job, "paused")
    elif repository.transition(session, job_id, ["running"], pause_requested=True):
        repository.add_event(session, job, "Pause requested; a checkpoint is written after the current step.")
    else:
        raise InvalidTransition(
            f"Job {job_id} is {job.status}; only queued or running jobs can be paused.", param="fine_tuning_job_id"
        )
    return get_job(session, subject, job_id)


def resume_job(
    session: Session, subject: AuthSubject, job_id: str, settings: Settings, caps: dict[str, int | None] | None = None
) -> Job:
    """Queue a paused job again, with its budget caps changed as `caps` says (None removes one)."""
    job = get_job(session, subject, job_id)
    if job.status == "paused":
        _check_room(session, subject, settings)
        if caps:
            job.method = budget.with_caps(job.method, caps)
        over = budget.reached(job.method, job.running_seconds, job.trained_tokens)
        if over is not None:
            raise InvalidRequest(
                f"Job {job_id} is paused at its budget: {over.describe()}. Resume it with a higher "
                f'{over.cap}, or null to remove the cap: a body such as {{"{over.cap}": null}} '
                f"(rft jobs resume {job_id} --{over.cap.replace('_', '-')} N|none).",
                param=over.cap,
            )
    values = {"status": "queued", "pause_requested": False, "enqueued_at": time.time()}
    if not repository.transition(session, job_id, ["paused"], **values):
        raise InvalidTransition(
            f"Job {job_id} is {job.status}; only paused jobs can be resumed.", param="fine_tuning_job_id"
        )
    repository.add_event(session, job, "Fine-tuning job resumed; it continues from its last checkpoint.")
    fleet.wake(session, settings, job_id)
    return get_job(session, subject, job_id)


def fine_tuned_model_name(job: Job) -> str:
    """OpenAI's shape: `ft:<base>:<org>:<suffix>:<job short id>` (the suffix may be empty)."""
    return f"ft:{job.model}:{job.project_id}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8]}"


def job_object(job: Job) -> JobObject:
    hyperparameters: dict[str, Any] = job.method.get("reinforcement", {}).get("hyperparameters", {})
    return JobObject(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        estimated_finish=job.estimated_finish,
        error=JobError(**job.error) if job.error else None,  # null, never OpenAI's `{}`
        fine_tuned_model=job.fine_tuned_model,
        model=job.model,
        organization_id=job.project_id,
        result_files=job.result_files or [],
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        seed=job.seed,
        method=job.method,
        metadata=job.metadata_,
        integrations=job.integrations,
        hyperparameters=hyperparameters,
        user_provided_suffix=job.suffix,
    )
