from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import File
from service.files import service as files_service
from tests.conftest import GOOD_LINES, job_body, jsonl, upload
from tests.support.procs import Proc


def test_upload_returns_openai_file_object_with_sha256(client: TestClient, auth: dict[str, str]) -> None:
    content = jsonl(GOOD_LINES)
    response = upload(client, auth, content)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    assert body["expires_at"] is None
    assert body["sha256"] == hashlib.sha256(content).hexdigest()


def test_uploaded_content_round_trips_byte_for_byte(client: TestClient, auth: dict[str, str]) -> None:
    content = jsonl(GOOD_LINES) + "héllo".encode() + b"\n"
    file_id = upload(client, auth, content).json()["id"]
    response = client.get(f"/v1/files/{file_id}/content", headers=auth)
    assert response.status_code == 200
    assert response.content == content


def test_list_paginates_with_after_cursor_newest_first(client: TestClient, auth: dict[str, str]) -> None:
    ids = [upload(client, auth, jsonl(GOOD_LINES), f"f{i}.jsonl").json()["id"] for i in range(5)]
    first = client.get("/v1/files", headers=auth, params={"limit": 2}).json()
    assert first["object"] == "list"
    assert [f["id"] for f in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    assert first["last_id"] == ids[3]
    rest = client.get("/v1/files", headers=auth, params={"limit": 10, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[::-1][2:]
    assert rest["has_more"] is False
    ascending = client.get("/v1/files", headers=auth, params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == ids


def test_delete_removes_row_and_bytes(
    client: TestClient, auth: dict[str, str], db_session: Session, tmp_path: Path
) -> None:
    file_id = upload(client, auth, jsonl(GOOD_LINES)).json()["id"]
    stored = client.app.state.storage.path(db_session.scalars(select(File).where(File.id == file_id)).one().storage_key)  # type: ignore[attr-defined]
    assert stored.exists()
    response = client.delete(f"/v1/files/{file_id}", headers=auth)
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not stored.exists()
    assert client.get(f"/v1/files/{file_id}", headers=auth).status_code == 404


def test_unknown_file_is_404_with_openai_error_shape(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/files/file-nope", headers=auth)
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "file-nope" in error["message"]


def test_upload_over_size_cap_is_413_and_keeps_nothing(client: TestClient, auth: dict[str, str]) -> None:
    client.app.state.settings.max_upload_bytes = 1000  # type: ignore[attr-defined]
    response = upload(client, auth, b'{"messages": []}\n' * 200)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]["message"]
    storage_root: Path = client.app.state.storage.root  # type: ignore[attr-defined]
    assert [p for p in storage_root.rglob("*") if p.is_file()] == []
    assert client.get("/v1/files", headers=auth).json()["data"] == []


def test_streamed_upload_without_content_length_is_capped_too(client: TestClient, auth: dict[str, str]) -> None:
    client.app.state.settings.max_upload_bytes = 5000  # type: ignore[attr-defined]
    boundary = "xyzboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()

    def body():  # type: ignore[no-untyped-def]
        yield head
        for _ in range(100):
            yield b"x" * 1000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/files", headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}, content=body()
    )
    assert response.status_code == 413


def test_wrong_purpose_is_400_naming_purpose(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/files", headers=auth, files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_non_jsonl_filename_is_400(client: TestClient, auth: dict[str, str]) -> None:
    response = upload(client, auth, jsonl(GOOD_LINES), "train.csv")
    assert response.status_code == 400
    assert ".jsonl" in response.json()["error"]["message"]


def test_empty_file_is_400(client: TestClient, auth: dict[str, str]) -> None:
    response = upload(client, auth, b"")
    assert response.status_code == 400
    assert "empty" in response.json()["error"]["message"]


def test_unknown_form_field_is_400(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/files", headers=auth, files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune", "colour": "blue"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "colour"


def test_missing_file_field_is_400(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"}, files={"other": ("a.txt", b"x")})
    assert response.status_code == 400


EXPIRING = {"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
ONE_LINE = b'{"messages":[{"role":"user","content":"x"}]}\n'


def test_expires_after_sets_expires_at_as_the_sdk_sends_it(client: TestClient, auth: dict[str, str]) -> None:
    import openai

    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client, max_retries=0
    )
    created = sdk.files.create(
        file=("t.jsonl", ONE_LINE), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 7200}
    )
    assert created.expires_at == created.created_at + 7200
    assert sdk.files.retrieve(created.id).expires_at == created.expires_at
    assert [f.expires_at for f in sdk.files.list()] == [created.expires_at]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"expires_after[seconds]": "3599"}, "expires_after[seconds]"),
        ({"expires_after[seconds]": "2592001"}, "expires_after[seconds]"),
        ({"expires_after[seconds]": "1.5e4"}, "expires_after[seconds]"),
        ({"expires_after[anchor]": "last_used_at"}, "expires_after[anchor]"),
        ({"expires_after[seconds]": None}, "expires_after[seconds]"),
        ({"expires_after[anchor]": None}, "expires_after[anchor]"),
    ],
)
def test_expires_after_outside_openais_range_is_400_and_keeps_nothing(
    client: TestClient, auth: dict[str, str], settings: Settings, fields: dict[str, str | None], param: str
) -> None:
    data = {k: v for k, v in (EXPIRING | fields).items() if v is not None}
    response = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", ONE_LINE)}, data=data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert not [p for p in settings.storage_dir.rglob("*") if p.is_file()]


def expire_now(db_session: Session, file_id: str) -> File:
    row = db_session.scalars(select(File).where(File.id == file_id)).one()
    row.expires_at = int(time.time()) - 1
    db_session.commit()
    return row


def test_an_expired_file_answers_404_at_once_and_the_expirer_deletes_its_row_and_bytes(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    keep = upload(client, auth, ONE_LINE).json()["id"]
    file_id = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", ONE_LINE)}, data=EXPIRING).json()["id"]
    stored = client.app.state.storage.path(expire_now(db_session, file_id).storage_key)  # type: ignore[attr-defined]
    for url in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert client.get(url, headers=auth).status_code == 404
    assert [f["id"] for f in client.get("/v1/files", headers=auth).json()["data"]] == [keep]
    assert stored.exists()  # until the expirer runs

    assert files_service.expire(db_session, client.app.state.storage) == 1  # type: ignore[attr-defined]
    db_session.commit()
    assert not stored.exists()
    assert db_session.scalars(select(File.id)).all() == [keep]


def test_jobs_whose_file_expired_fail_saying_so_whether_validating_or_queued(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    from workers import runner, validate

    def post(path: str, **kwargs: Any) -> Any:
        return live_client.post(path, headers=live_auth, **kwargs).json()

    file_id = post("/v1/files", files={"file": ("t.jsonl", jsonl(GOOD_LINES))}, data=EXPIRING)["id"]
    queued, validating = post("/v1/fine_tuning/jobs", json=job_body(file_id)), None
    validate.validate_job(queued["id"], live_settings)
    validating = post("/v1/fine_tuning/jobs", json=job_body(file_id))
    with unit_of_work(live_settings) as session:
        session.scalars(select(File).where(File.id == file_id)).one().expires_at = int(time.time()) - 1
    validate.validate_job(validating["id"], live_settings)
    runner.run_job(queued["id"], live_settings)
    for job_id, when in ((validating["id"], "after the job was created"), (queued["id"], "before training")):
        error = live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).json()["error"]
        assert error["param"] == "training_file"
        assert f"{file_id} expired or was deleted {when}" in error["message"]
    refused = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "training_file"


def test_the_light_worker_with_beat_expires_files_on_its_own(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, procs: list[Proc], tmp_path: Path
) -> None:
    """The periodic task runs where the lease reaper runs: `rft worker --queues light --beat`, which
    `rft serve` starts too."""
    file_id = live_client.post(
        "/v1/files", headers=live_auth, files={"file": ("t.jsonl", ONE_LINE)}, data=EXPIRING
    ).json()["id"]
    with unit_of_work(live_settings) as session:
        row = session.scalars(select(File).where(File.id == file_id)).one()
        row.expires_at, key = int(time.time()) - 1, row.storage_key
    stored = live_settings.storage_dir / key
    assert stored.exists()
    env = {
        "RFT_DATABASE_URL": live_settings.database_url,
        "RFT_DATA_DIR": str(live_settings.data_dir),
        "RFT_BROKER_URL": "",  # the filesystem broker under the data dir, as `rft serve` embeds it
        "RFT_FILE_EXPIRY_INTERVAL_SECONDS": "0.5",
    }
    procs.append(Proc(["worker", "--queues", "light", "--beat"], env, tmp_path / "light.log"))
    deadline = time.monotonic() + 60
    while stored.exists():
        assert time.monotonic() < deadline, procs[0].output()[-3000:]
        time.sleep(0.2)
    with unit_of_work(live_settings) as session:
        assert session.scalars(select(File).where(File.id == file_id)).first() is None
