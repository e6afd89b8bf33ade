from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.app import create_app
from service.auth.service import hash_key
from service.core.ids import new_id
from service.core.settings import Settings
from service.core.tables import ApiKey, Checkpoint, Job, WebhookEndpoint
from tests.conftest import job_body


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer rft-wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}],
)
def test_missing_or_bad_key_is_401_in_openai_shape(client: TestClient, headers: dict[str, str]) -> None:
    response = client.get("/v1/files", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["message"]


def test_keys_are_stored_only_as_hmac(db_session: Session, auth: dict[str, str], settings: Settings) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")
    stored = db_session.scalars(select(ApiKey)).all()
    assert [k.key_hash for k in stored] == [hash_key(key, settings.secret_key)]
    dump = " ".join(str(row) for row in db_session.execute(text("SELECT * FROM api_keys")).all())
    assert key not in dump and key[8:] not in dump


def test_revoked_key_is_401(client: TestClient, db_session: Session, auth: dict[str, str]) -> None:
    db_session.scalars(select(ApiKey)).one().revoked_at = 1
    db_session.commit()
    assert client.get("/v1/files", headers=auth).status_code == 401


def test_revoked_key_stops_working_within_the_cache_ttl(
    settings: Settings, db_session: Session, auth: dict[str, str]
) -> None:
    """A key revoked while a process has it cached: the revocation must win within the TTL."""
    app = create_app(settings.model_copy(update={"auth_cache_seconds": 0.5}))
    app.state.sessionmaker = lambda: db_session
    with TestClient(app) as client:
        assert client.get("/v1/files", headers=auth).status_code == 200  # now cached
        db_session.scalars(select(ApiKey)).one().revoked_at = 1
        db_session.commit()
        revoked_at = time.monotonic()
        while client.get("/v1/files", headers=auth).status_code != 401:
            assert time.monotonic() - revoked_at < 1.5, "a revoked key kept working past the cache TTL"
            time.sleep(0.05)


def test_a_wrong_key_is_refused_even_right_after_a_valid_one(client: TestClient, auth: dict[str, str]) -> None:
    assert client.get("/v1/files", headers=auth).status_code == 200
    wrong = {"Authorization": auth["Authorization"][:-1] + ("A" if auth["Authorization"][-1] != "A" else "B")}
    assert client.get("/v1/files", headers=wrong).status_code == 401


def _another_projects_job(client: TestClient, auth: dict[str, str], db_session: Session) -> tuple[str, str]:
    file_id = client.post(
        "/v1/files",
        headers=auth,
        files={"file": ("t.jsonl", b'{"messages":[{"role":"user","content":"x"}]}\n')},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(file_id)).json()["id"]
    job = db_session.scalars(select(Job).where(Job.id == job_id)).one()
    db_session.add(
        Checkpoint(
            id=new_id("ftckpt-"),
            project_id=job.project_id,
            job_id=job_id,
            step_number=1,
            fine_tuned_model_checkpoint="ft:x",
            metrics={},
            storage_key="checkpoints/x",
        )
    )
    db_session.add(
        WebhookEndpoint(
            id="we_theirs", project_id=job.project_id, name="x", url="https://1.1.1.1/", event_types=[], secret="s"
        )
    )
    db_session.commit()
    return file_id, job_id


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/files/{file}"),
        ("get", "/v1/files/{file}/content"),
        ("delete", "/v1/files/{file}"),
        ("get", "/v1/fine_tuning/jobs/{job}"),
        ("delete", "/v1/fine_tuning/jobs/{job}"),
        ("get", "/v1/fine_tuning/jobs/{job}/events"),
        ("get", "/v1/fine_tuning/jobs/{job}/checkpoints"),
        ("post", "/v1/fine_tuning/jobs/{job}/cancel"),
        ("post", "/v1/fine_tuning/jobs/{job}/pause"),
        ("post", "/v1/fine_tuning/jobs/{job}/resume"),
        ("get", "/v1/webhook_endpoints/{webhook}"),
        ("post", "/v1/webhook_endpoints/{webhook}"),
        ("delete", "/v1/webhook_endpoints/{webhook}"),
        ("post", "/v1/webhook_endpoints/{webhook}/rotate_secret"),
        ("post", "/v1/webhook_endpoints/{webhook}/test"),
        ("get", "/v1/webhook_endpoints/{webhook}/deliveries"),
        ("get", "/v1/models/{ckpt}"),
        ("delete", "/v1/models/{ckpt}"),
        ("get", "/v1/fine_tuning/checkpoints/{ckpt}/permissions"),
        ("delete", "/v1/fine_tuning/checkpoints/{ckpt}/permissions/cp_x"),
    ],
)
def test_other_projects_objects_answer_404_like_missing_ones(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], db_session: Session, method: str, path: str
) -> None:
    file_id, job_id = _another_projects_job(client, auth, db_session)
    body = {"event_type": "fine_tuning.job.succeeded"} if path.endswith("/test") else {}
    send = getattr(client, method)
    kwargs = {"json": body} if method == "post" else {}
    theirs = send(path.format(file=file_id, job=job_id, webhook="we_theirs", ckpt="ft:x"), headers=other_auth, **kwargs)
    missing = send(
        path.format(file="file-missing", job="ftjob-missing", webhook="we_missing", ckpt="ft:missing"),
        headers=other_auth,
        **kwargs,
    )
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    assert client.get(f"/v1/files/{file_id}", headers=auth).status_code == 200


def test_lists_show_only_the_callers_project(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], db_session: Session
) -> None:
    file_id, job_id = _another_projects_job(client, auth, db_session)
    assert client.get("/v1/files", headers=other_auth).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=other_auth).json()["data"] == []
    assert client.get("/v1/webhook_endpoints", headers=other_auth).json()["data"] == []
    body = job_body(file_id)
    response = client.post("/v1/fine_tuning/jobs", headers=other_auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "training_file"


def test_cli_keys_create_prints_a_working_key(tmp_path: Any) -> None:
    env = {**os.environ, "RFT_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--project", "team-a"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("rft-")
    from service.app import create_app

    app = create_app(Settings(data_dir=tmp_path))
    with TestClient(app) as client:
        assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/v1/files", headers={"Authorization": "Bearer rft-other"}).status_code == 401
