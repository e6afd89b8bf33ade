"""Sharing checkpoints with other projects (OpenAI's checkpoint permissions) and deleting fine-tuned models.

A permission lets the granted project use the checkpoint as its own for reading: train from it (a
job's `model`), chat with it, see it in `/v1/models` (`service.auth.service.readable(..., shared=True)`).
Managing it (granting, listing, revoking, deleting, downloading) stays with the owner; to anyone else
the checkpoint answers 404 exactly as a missing one. Revoking takes effect at the next request: chat
and job creation check on each call, and a worker checks again when it loads the model.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.checkpoints import repository
from service.core.db import on_commit
from service.core.errors import InvalidRequest, NotFound
from service.core.ids import new_id
from service.core.storage import Storage
from service.core.tables import JOB_TERMINAL, Checkpoint, CheckpointPermission
from service.jobs import repository as jobs
from service.models import repository as models
from service.models.registry import forget_loaded
from service.models.service import refuse_if_in_use


def owned_checkpoint(session: Session, subject: AuthSubject, name: str) -> Checkpoint:
    ckpt = repository.owned_checkpoint(session, subject, name)
    if ckpt is None:
        raise NotFound(f"No such fine-tuned model checkpoint: {name}", param="fine_tuned_model_checkpoint")
    return ckpt


def grant(session: Session, subject: AuthSubject, name: str, project_ids: list[str]) -> list[CheckpointPermission]:
    """One permission per project (an existing one is returned as it is), in the order asked."""
    ckpt = owned_checkpoint(session, subject, name)
    status = repository.job_status(session, ckpt.job_id)
    if status not in JOB_TERMINAL:
        raise InvalidRequest(
            f"Checkpoint {name!r} belongs to job {ckpt.job_id}, which is {status}: its checkpoints may still be "
            "pruned. Share it once the job has finished.",
            param="fine_tuned_model_checkpoint",
        )
    granted = []
    for index, project_id in enumerate(dict.fromkeys(project_ids)):
        param = f"project_ids.{index}"
        if project_id == subject.project_id:
            raise InvalidRequest(f"{project_id} is this checkpoint's own project; it has it already.", param=param)
        if not repository.project_exists(session, project_id):
            raise InvalidRequest(f"No project with id {project_id!r}.", param=param)
        row = repository.permission_for(session, subject, ckpt, project_id)
        if row is None:
            row = CheckpointPermission(
                id=new_id("cp_"), project_id=subject.project_id, checkpoint_id=ckpt.id, granted_project_id=project_id
            )
            session.add(row)
            session.flush()
        granted.append(row)
    return granted


def list_permissions(
    session: Session,
    subject: AuthSubject,
    name: str,
    *,
    project_id: str | None,
    after: str | None,
    limit: int,
    order: Literal["ascending", "descending"],
) -> tuple[list[CheckpointPermission], bool]:
    ckpt = owned_checkpoint(session, subject, name)
    rows, has_more = repository.page_permissions(
        session,
        subject,
        ckpt,
        project_id=project_id,
        after=after,
        limit=limit,
        order="asc" if order == "ascending" else "desc",
    )
    return list(rows), has_more


def revoke(session: Session, subject: AuthSubject, name: str, permission_id: str) -> None:
    ckpt = owned_checkpoint(session, subject, name)
    row = repository.get_permission(session, subject, ckpt, permission_id)
    if row is None:
        raise NotFound(f"No such permission of checkpoint {name}: {permission_id}", param="permission_id")
    session.delete(row)
    session.flush()


def delete_model(session: Session, storage: Storage, subject: AuthSubject, name: str) -> None:
    """Delete the caller's fine-tuned model `name` (a job's final model: all of that job's checkpoints;
    any other checkpoint name: that checkpoint), their permissions now, their bytes once that commits.
    The job stays, with `fine_tuned_model` null and an event saying what went."""
    job = models.owned_job_with_model(session, subject, name)
    if job is not None:
        doomed = list(models.checkpoints_of_job(session, job.id))
    else:
        ckpt = repository.owned_checkpoint(session, subject, name)
        if ckpt is None:
            raise NotFound(f"The model {name!r} does not exist or you do not have access to it.", param="model")
        doomed = [ckpt]
        job = models.job_of(session, ckpt)
    refuse_if_in_use(session, subject, doomed)
    keys = [c.storage_key for c in doomed]
    repository.delete_checkpoints(session, doomed)
    if job.fine_tuned_model in {name, *(c.fine_tuned_model_checkpoint for c in doomed)}:
        job.fine_tuned_model = None
    jobs.add_event(session, job, f"Fine-tuned model {name} deleted ({len(keys)} checkpoint(s) and their bytes).")

    def remove_bytes() -> None:  # only once the rows are gone for good
        for key in keys:
            forget_loaded(storage.local_path(key))
            storage.delete(key)

    on_commit(session, remove_bytes)
