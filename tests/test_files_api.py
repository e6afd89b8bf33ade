from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.tables import File
from tests.conftest import GOOD_LINES, jsonl, upload


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


def test_expires_after_is_refused_not_stored_and_ignored(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/files",
        headers=auth,
        files={"file": ("t.jsonl", b'{"messages":[{"role":"user","content":"x"}]}\n')},
        data={"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "expires_after[anchor]"
    assert "kept until you delete them" in response.json()["error"]["message"]
    assert client.get("/v1/files", headers=auth).json()["data"] == []
