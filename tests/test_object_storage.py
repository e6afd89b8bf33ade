"""Object storage: the S3 backend (against moto's S3 server over HTTP) keeps every guarantee of the
local folder, and the API and the trainer work with no shared folder at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core.s3 import MANIFEST, PART_BYTES, S3Storage, StorageCorrupt, _MultipartWriter
from service.core.settings import Settings
from service.core.storage import LocalStorage, Storage, storage_for
from tests.conftest import jsonl, make_key, upload
from tests.test_downloads import download, unpack
from tests.test_rl import job, run_job


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return storage_for(request.getfixturevalue("s3_settings"))


def objects(storage: S3Storage) -> list[str]:
    listed = storage.client.list_objects_v2(Bucket=storage.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def another_host(settings: Settings, tmp_path: Path) -> S3Storage:
    """The same bucket seen from a host with an empty cache."""
    store = storage_for(settings.model_copy(update={"cache_root": tmp_path / "other-host"}))
    assert isinstance(store, S3Storage)
    return store


def test_a_streamed_object_appears_only_on_commit_and_reads_back_by_range(store: Storage) -> None:
    data = os.urandom(PART_BYTES * 2 + 12345)  # three multipart parts on S3
    out = store.writer("files/p/a")
    for i in range(0, len(data), 1 << 20):
        out.write(data[i : i + (1 << 20)])
        if isinstance(out, _MultipartWriter):
            assert len(out.buffer) < PART_BYTES  # constant memory: at most one part is held
    assert not store.exists("files/p/a")
    out.commit()
    assert store.size("files/p/a") == len(data)
    assert b"".join(store.iter_bytes("files/p/a")) == data
    assert b"".join(store.iter_bytes("files/p/a", 100, PART_BYTES + 99)) == data[100 : PART_BYTES + 100]

    aborted = store.writer("files/p/b")
    aborted.write(data)
    aborted.abort()
    assert not store.exists("files/p/b")
    if isinstance(store, S3Storage):  # no multipart upload left behind to bill for
        assert not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")
    store.delete("files/p/a")
    assert not store.exists("files/p/a")


def test_keys_that_could_leave_the_store_are_refused(store: Storage) -> None:
    for evil in ("../x", "files/../../etc", "/abs", "files//x", "files/p/a b"):
        with pytest.raises(ValueError, match="invalid storage key"):
            store.writer(evil)
        with pytest.raises(ValueError, match="invalid storage key"):
            store.local_path(evil)


def write_folder(store: Storage, key: str) -> dict[str, bytes]:
    files = {"model.safetensors": os.urandom(PART_BYTES + 10), "config.json": b"{}", "sub/x.bin": b"xyz"}
    staging = store.staging_dir(key)
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
        os.utime(staging / name, (1_700_000_000.5, 1_700_000_000.5))
    store.commit_dir(staging, key)
    return files


def test_a_committed_folder_is_fetched_whole_by_another_host_with_its_write_times(
    s3_settings: Settings, tmp_path: Path
) -> None:
    store = storage_for(s3_settings)
    files = write_folder(store, "checkpoints/p/j/step-000001")
    fetched = another_host(s3_settings, tmp_path).local_dir("checkpoints/p/j/step-000001")
    assert fetched != store.local_path("checkpoints/p/j/step-000001")
    for name, data in files.items():
        assert (fetched / name).read_bytes() == data
        assert (fetched / name).stat().st_mtime == 1_700_000_000.5  # so archives match byte for byte
        assert oct((fetched / name).stat().st_mode & 0o777) == "0o600"
    assert not (fetched / MANIFEST).exists()  # the manifest stays out of the folder (and its archive)


def test_a_folder_whose_manifest_was_never_written_does_not_exist(s3_settings: Settings, tmp_path: Path) -> None:
    """A crash after the objects but before the manifest: readers see nothing, and a second commit
    of the same step replaces the leftovers."""
    store = storage_for(s3_settings)
    assert isinstance(store, S3Storage)
    write_folder(store, "checkpoints/p/j/step-000002")
    store.client.delete_object(Bucket=store.bucket, Key=store._name(f"checkpoints/p/j/step-000002/{MANIFEST}"))
    store.client.put_object(Bucket=store.bucket, Key=store._name("checkpoints/p/j/step-000002/stale.bin"), Body=b"x")
    with pytest.raises(FileNotFoundError, match="no committed folder"):
        another_host(s3_settings, tmp_path).local_dir("checkpoints/p/j/step-000002")
    write_folder(store, "checkpoints/p/j/step-000002")
    names = [n.rsplit("/", 1)[-1] for n in objects(store)]
    assert "stale.bin" not in names and MANIFEST in names


def test_a_tampered_object_is_refused_on_fetch(s3_settings: Settings, tmp_path: Path) -> None:
    store = storage_for(s3_settings)
    assert isinstance(store, S3Storage)
    write_folder(store, "checkpoints/p/j/step-000003")
    name = store._name("checkpoints/p/j/step-000003/config.json")
    store.client.put_object(Bucket=store.bucket, Key=name, Body=b'{"evil": 1}')
    with pytest.raises(StorageCorrupt, match="config.json"):
        another_host(s3_settings, tmp_path).local_dir("checkpoints/p/j/step-000003")


def test_deleting_a_folder_removes_every_object_and_the_local_copy(s3_settings: Settings) -> None:
    store = storage_for(s3_settings)
    assert isinstance(store, S3Storage)
    write_folder(store, "checkpoints/p/j/step-000004")
    write_folder(store, "checkpoints/p/k/step-000001")
    store.delete("checkpoints/p/j")
    assert all("/j/" not in name for name in objects(store)) and any("/k/" in name for name in objects(store))
    assert not store.local_path("checkpoints/p/j").exists()


def test_uploads_downloads_and_deletes_go_through_the_bucket(s3_settings: Settings, sent_tasks: list[Any]) -> None:
    content = jsonl([{"messages": [{"role": "user", "content": f"q{i}"}], "answer": "a"} for i in range(200)])
    with TestClient(create_app(s3_settings)) as client:
        auth = live_key(s3_settings)
        file_id = upload(client, auth, content).json()["id"]
        store = storage_for(s3_settings)
        assert isinstance(store, S3Storage)
        assert len(objects(store)) == 1 and objects(store)[0].startswith("rft/files/")
        assert not (s3_settings.storage_dir).exists() or not any(s3_settings.storage_dir.rglob("*"))

        url = f"/v1/files/{file_id}/content"
        whole = client.get(url, headers=auth)
        assert whole.content == content and whole.headers["etag"] == f'"{hashlib.sha256(content).hexdigest()}"'
        part = client.get(url, headers={**auth, "Range": "bytes=100-199", "If-Range": whole.headers["etag"]})
        assert part.status_code == 206 and part.content == content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
        assert client.get(url, headers={**auth, "Range": "bytes=-10"}).content == content[-10:]
        assert client.get(url, headers={**auth, "Range": f"bytes={len(content)}-"}).status_code == 416

        assert client.delete(f"/v1/files/{file_id}", headers=auth).status_code == 200
        assert objects(store) == []


def live_key(settings: Settings) -> dict[str, str]:
    from service.core import db

    with db.unit_of_work(settings) as session:
        return make_key(session, settings, "s3-tenant")


def test_a_job_trains_and_its_checkpoint_downloads_with_no_local_storage(
    s3_settings: Settings, sent_tasks: list[Any], tmp_path: Path
) -> None:
    with TestClient(create_app(s3_settings)) as client:
        auth = live_key(s3_settings)
        job_id = run_job(client, auth, s3_settings, n_epochs=1)
        row = job(s3_settings, job_id)
        assert row.status == "succeeded", row.error
        assert not s3_settings.storage_dir.exists() or not any(s3_settings.storage_dir.rglob("*"))
        store = storage_for(s3_settings)
        assert isinstance(store, S3Storage)
        assert any(name.endswith(MANIFEST) for name in objects(store))

        body = download(client, auth, f"/v1/fine_tuning/jobs/{job_id}/content")
        assert any(name.endswith(".archive/model-v2.tar") for name in objects(store))
        folder = unpack(body, tmp_path / "model")
        assert (folder / "config.json").exists() and not (folder / "trainer_state.pt").exists()

    # Another API host, with an empty cache, serves the same bytes (the ETag a resume relies on) ...
    elsewhere = s3_settings.model_copy(update={"cache_root": tmp_path / "api-2"})
    with TestClient(create_app(elsewhere)) as client:
        again = client.get(f"/v1/fine_tuning/jobs/{job_id}/content", headers=auth)
        assert again.content == body
        # ... and rebuilds an identical archive from a fresh copy of the checkpoint.
        digest = store._name(f"{archive_prefix(store, job_id)}/model-v2.sha256")
        store.client.delete_object(Bucket=store.bucket, Key=digest)
        rebuilt = client.get(f"/v1/fine_tuning/jobs/{job_id}/content", headers=auth)
        assert rebuilt.headers["etag"] == again.headers["etag"]

        assert client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).status_code == 200
    assert [name for name in objects(store) if job_id in name] == []


def archive_prefix(store: S3Storage, job_id: str) -> str:
    tar = next(name for name in objects(store) if job_id in name and name.endswith("model-v2.tar"))
    return tar.removeprefix(f"{store.prefix}/").rsplit("/", 1)[0]


def test_presigned_downloads_redirect_to_the_store_and_a_tenant_cannot_bend_the_url(
    s3_settings: Settings, sent_tasks: list[Any]
) -> None:
    presigning = s3_settings.model_copy(update={"s3_presigned_downloads": True})
    mine, theirs = jsonl([{"messages": [{"role": "user", "content": "mine"}]}]), jsonl([{"secret": "theirs"}])
    with TestClient(create_app(presigning)) as client:
        auth, other = live_key(presigning), other_key(presigning)
        file_id = upload(client, auth, mine).json()["id"]
        their_id = upload(client, other, theirs).json()["id"]
        redirect = client.get(f"/v1/files/{file_id}/content", headers=auth, follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["x-content-sha256"] == hashlib.sha256(mine).hexdigest()
        location = redirect.headers["location"]
        assert httpx.get(location).content == mine  # the store serves it, no API key needed, for a while
        assert httpx.get(location, headers={"Range": "bytes=2-5"}).content == mine[2:6]
        assert client.get(f"/v1/files/{their_id}/content", headers=auth, follow_redirects=False).status_code == 404
        # The signature covers the key: pointing my URL at the other tenant's object is refused.
        bent = location.replace(file_id, their_id)
        assert bent != location and httpx.get(bent).status_code == 403


def other_key(settings: Settings) -> dict[str, str]:
    from service.core import db

    with db.unit_of_work(settings) as session:
        return make_key(session, settings, "s3-other-tenant")


def test_a_bad_storage_url_or_an_unreachable_store_is_a_clear_error_at_start(s3_settings: Settings) -> None:
    with pytest.raises(ValueError, match="RFT_STORAGE_URL='s3:/x' is not an S3 URL"):
        Settings(storage_url="s3:/x")
    missing = s3_settings.model_copy(update={"storage_url": "s3://no-such-bucket-here"})
    with pytest.raises(RuntimeError, match="s3://no-such-bucket-here at http://127.0.0.1:.* cannot be used"):
        create_app(missing)
