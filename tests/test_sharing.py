"""Checkpoint permissions (OpenAI's `fine_tuning.checkpoints.permissions`) and `DELETE /v1/models`,
driven through the SDK and attacked by the projects that must not get through."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth.service import create_api_key
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint, CheckpointPermission, Job
from tests.conftest import GOOD_LINES, GRADER, job_body, jsonl, set_job_flags, train_local_model, upload

HYPER = {"n_epochs": 1, "batch_size": 2, "max_completion_tokens": 2, "beta": 0.0, "eval_samples": 1}
MISSING = "ft:tiny-random-llama:proj_nobody::deadbeef:ckpt-step-1"


@dataclass
class Tenant:
    project_id: str
    headers: dict[str, str]
    sdk: openai.OpenAI


@dataclass
class Shared:
    owner: Tenant
    grantee: Tenant
    stranger: Tenant
    job_id: str
    model: str  # the job's fine-tuned model, one of its checkpoints


def tenant(client: TestClient, settings: Settings, name: str) -> Tenant:
    with unit_of_work(settings) as session:
        project, key = create_api_key(session, settings, name)
        project_id = project.id
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
    return Tenant(project_id, {"Authorization": f"Bearer {key}"}, sdk)


@pytest.fixture
def shared(live_client: TestClient, live_settings: Settings) -> Iterator[Shared]:
    owner = tenant(live_client, live_settings, "owner")
    job_id = train_local_model(
        live_client, owner.headers, live_settings, "tiny-random-llama", GOOD_LINES[:2], GRADER, HYPER
    )
    model = live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=owner.headers).json()["fine_tuned_model"]
    yield Shared(
        owner,
        tenant(live_client, live_settings, "grantee"),
        tenant(live_client, live_settings, "stranger"),
        job_id,
        model,
    )


def chat(client: TestClient, who: Tenant, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return client.post("/v1/chat/completions", headers=who.headers, json=body)


def new_job(client: TestClient, who: Tenant, model: str) -> Any:
    file_id = upload(client, who.headers, jsonl(GOOD_LINES[:2])).json()["id"]
    body = job_body(file_id, model=model)
    body["method"]["reinforcement"]["hyperparameters"] = HYPER
    return client.post("/v1/fine_tuning/jobs", headers=who.headers, json=body)


def listed(client: TestClient, who: Tenant) -> dict[str, str]:
    return {m["id"]: m["owned_by"] for m in client.get("/v1/models", headers=who.headers).json()["data"]}


def as_missing(client: TestClient, who: Tenant, model: str) -> None:
    """`model` answers `who` exactly as a model that does not exist."""
    assert model not in listed(client, who)
    assert client.get(f"/v1/models/{model}", headers=who.headers).status_code == 404
    for call in (chat, new_job):
        theirs, missing = call(client, who, model).json()["error"], call(client, who, MISSING).json()["error"]
        assert (theirs["code"], theirs["param"]) == (missing["code"], missing["param"]) == ("invalid_request", "model")


def test_a_grantee_trains_from_chats_with_and_lists_a_shared_checkpoint_until_it_is_revoked(
    shared: Shared, live_client: TestClient, live_settings: Settings
) -> None:
    from workers import runner, validate

    as_missing(live_client, shared.grantee, shared.model)
    page = shared.owner.sdk.fine_tuning.checkpoints.permissions.create(
        shared.model, project_ids=[shared.grantee.project_id]
    )
    assert [(p.object, p.project_id) for p in page.data] == [("checkpoint.permission", shared.grantee.project_id)]

    assert listed(live_client, shared.grantee)[shared.model] == shared.owner.project_id
    assert shared.grantee.sdk.models.retrieve(shared.model).owned_by == shared.owner.project_id
    answer = shared.grantee.sdk.chat.completions.create(
        model=shared.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    trained = new_job(live_client, shared.grantee, shared.model).json()
    validate.validate_job(trained["id"], live_settings)
    runner.run_job(trained["id"], live_settings)
    done = live_client.get(f"/v1/fine_tuning/jobs/{trained['id']}", headers=shared.grantee.headers).json()
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"].startswith(f"ft:{shared.model}:{shared.grantee.project_id}:")
    queued = new_job(live_client, shared.grantee, shared.model).json()  # created while the grant holds
    validate.validate_job(queued["id"], live_settings)

    shared.owner.sdk.fine_tuning.checkpoints.permissions.delete(
        page.data[0].id, fine_tuned_model_checkpoint=shared.model
    )
    as_missing(live_client, shared.grantee, shared.model)
    runner.run_job(queued["id"], live_settings)  # the worker checks the grant again when it loads the model
    failed = live_client.get(f"/v1/fine_tuning/jobs/{queued['id']}", headers=shared.grantee.headers).json()
    assert failed["status"] == "failed"
    assert failed["error"]["param"] == "model" and shared.model in failed["error"]["message"]
    # What the grantee trained is its own: it outlives the grant.
    assert chat(live_client, shared.grantee, done["fine_tuned_model"]).status_code == 200


def test_the_owner_lists_permissions_filtered_ordered_and_paged(shared: Shared, live_client: TestClient) -> None:
    grantees = [shared.grantee.project_id, shared.stranger.project_id]
    created = shared.owner.sdk.fine_tuning.checkpoints.permissions.create(shared.model, project_ids=grantees).data
    again = shared.owner.sdk.fine_tuning.checkpoints.permissions.create(shared.model, project_ids=grantees[:1]).data
    assert [p.id for p in again] == [created[0].id]  # granting twice keeps the one permission
    permissions = shared.owner.sdk.fine_tuning.checkpoints.permissions
    newest = permissions.list(shared.model, limit=1)
    assert [p.id for p in newest.data] == [created[1].id] and newest.has_more
    assert [p.id for p in permissions.list(shared.model, order="ascending").data] == [p.id for p in created]
    rest = permissions.list(shared.model, after=created[1].id)
    assert [p.id for p in rest.data] == [created[0].id] and not rest.has_more
    only = permissions.list(shared.model, project_id=shared.stranger.project_id).data
    assert [p.project_id for p in only] == [shared.stranger.project_id]


@pytest.mark.parametrize("attacker", ["stranger", "grantee"])
def test_no_project_but_the_owner_can_see_grant_list_revoke_or_delete(
    shared: Shared, live_client: TestClient, live_settings: Settings, attacker: str
) -> None:
    """The grantee may use the checkpoint, never manage it; to both it answers 404 like a missing one."""
    grant = shared.owner.sdk.fine_tuning.checkpoints.permissions.create(
        shared.model, project_ids=[shared.grantee.project_id]
    ).data[0]
    who: Tenant = getattr(shared, attacker)
    base = "/v1/fine_tuning/checkpoints/{}/permissions"
    attempts: list[tuple[str, str, Any]] = [
        ("post", base, {"project_ids": [shared.stranger.project_id]}),
        ("get", base, None),
        ("delete", base + f"/{grant.id}", None),
        ("delete", "/v1/models/{}", None),
    ]
    for method, path, body in attempts:
        theirs = live_client.request(method, path.format(shared.model), headers=who.headers, json=body)
        missing = live_client.request(method, path.format(MISSING), headers=who.headers, json=body)
        assert theirs.status_code == missing.status_code == 404, (method, path, theirs.text)
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    with unit_of_work(live_settings) as session:  # nothing changed hands
        rows = session.scalars(select(CheckpointPermission.granted_project_id)).all()
        assert rows == [shared.grantee.project_id]
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == shared.job_id)).first() is not None


def test_granting_needs_a_real_other_project_and_a_finished_job(
    shared: Shared, live_client: TestClient, live_settings: Settings
) -> None:
    url = f"/v1/fine_tuning/checkpoints/{shared.model}/permissions"
    for project_ids, param in (([shared.owner.project_id], "project_ids.0"), (["proj_nobody"], "project_ids.0")):
        response = live_client.post(url, headers=shared.owner.headers, json={"project_ids": project_ids})
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    set_job_flags(live_settings, shared.job_id, status="running")
    response = live_client.post(url, headers=shared.owner.headers, json={"project_ids": [shared.grantee.project_id]})
    assert response.status_code == 400 and "running" in response.json()["error"]["message"]


def test_deleting_a_model_removes_its_checkpoints_bytes_and_permissions(
    shared: Shared, live_client: TestClient, live_settings: Settings
) -> None:
    shared.owner.sdk.fine_tuning.checkpoints.permissions.create(shared.model, project_ids=[shared.grantee.project_id])
    with unit_of_work(live_settings) as session:
        keys = session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == shared.job_id)).all()
    folders = [live_settings.storage_dir / key for key in keys]
    assert folders and all(f.is_dir() for f in folders)
    assert chat(live_client, shared.owner, shared.model).status_code == 200  # loaded in this process now

    deleted = shared.owner.sdk.models.delete(shared.model)
    assert (deleted.id, deleted.object, deleted.deleted) == (shared.model, "model", True)
    assert not any(f.exists() for f in folders)
    with unit_of_work(live_settings) as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == shared.job_id)).all() == []
        assert session.scalars(select(CheckpointPermission)).all() == []
        assert session.scalars(select(Job.fine_tuned_model).where(Job.id == shared.job_id)).one() is None
    for who in (shared.owner, shared.grantee):
        as_missing(live_client, who, shared.model)
    events = shared.owner.sdk.fine_tuning.jobs.list_events(shared.job_id).data
    assert any(f"{shared.model} deleted" in e.message for e in events)
    assert live_client.delete(f"/v1/models/{shared.model}", headers=shared.owner.headers).status_code == 404


def test_a_model_in_use_by_an_unfinished_job_is_a_409_naming_it_until_the_use_ends(
    shared: Shared, live_client: TestClient, live_settings: Settings
) -> None:
    url = f"/v1/models/{shared.model}"
    own = new_job(live_client, shared.owner, shared.model).json()["id"]
    refused = live_client.delete(url, headers=shared.owner.headers)
    assert refused.status_code == 409 and own in refused.json()["error"]["message"]
    live_client.post(f"/v1/fine_tuning/jobs/{own}/cancel", headers=shared.owner.headers)

    grant = shared.owner.sdk.fine_tuning.checkpoints.permissions.create(
        shared.model, project_ids=[shared.grantee.project_id]
    ).data[0]
    theirs = new_job(live_client, shared.grantee, shared.model).json()["id"]
    refused = live_client.delete(url, headers=shared.owner.headers)
    assert refused.status_code == 409 and shared.grantee.project_id in refused.json()["error"]["message"]
    assert theirs not in refused.json()["error"]["message"]  # another project's job id is not the owner's to see
    job_url = f"/v1/fine_tuning/jobs/{shared.job_id}"
    assert live_client.delete(job_url, headers=shared.owner.headers).status_code == 409  # deleting its job alike
    shared.owner.sdk.fine_tuning.checkpoints.permissions.delete(grant.id, fine_tuned_model_checkpoint=shared.model)
    assert live_client.delete(url, headers=shared.owner.headers).status_code == 200  # that job fails when it starts
