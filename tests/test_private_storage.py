"""Attack: another local user (uid 65534, `nobody`) tries to read what a real `rft serve` wrote.

The data folder is made with a plain `mkdir` at 0755 outside /tmp, as a Docker volume or an
operator leaves it, and the server starts under a careless umask. After an upload, a training job
with checkpoints and an archive download, the intruder must be able to open no file and list no
folder, and every entry must carry no group or other bits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.core.private import make_tree_private, private_dir, write_private
from service.core.storage import LocalStorage
from tests.conftest import GOOD_LINES, GRADER, jsonl, upload
from tests.support.procs import Proc, free_port, printed_api_key, wait_healthy

NOBODY = 65534


@pytest.fixture
def data_dir() -> Iterator[Path]:
    folder = Path("/var/tmp") / f"rft-private-{uuid.uuid4().hex[:10]}"
    folder.mkdir()
    folder.chmod(0o755)  # what `mkdir` under the usual umask, or a fresh Docker volume, gives
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def readable_by(uid: int, paths: list[Path]) -> list[str]:
    """The paths that `uid` can open (files) or list (folders), probed in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            leaked = []
            for path in paths:
                with contextlib.suppress(OSError):
                    if path.is_dir():
                        os.listdir(path)
                    else:
                        with open(path, "rb") as f:
                            f.read(1)
                    leaked.append(str(path))
            os.write(write_end, "\n".join(leaked).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the probe as nobody failed to run"
    return [line for line in report.splitlines() if line]


def everything_under(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def run_flow(base: str, key: str) -> dict[str, str]:
    """Upload, train a ticking job to its end, download a checkpoint archive, delete one file."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as http:

        def send(name: str, lines: list[Any]) -> str:
            response = http.post("/files", files={"file": (name, jsonl(lines))}, data={"purpose": "fine-tune"})
            assert response.status_code == 200, response.text
            return str(response.json()["id"])

        train, doomed = send("train.jsonl", GOOD_LINES[:4]), send("doomed.jsonl", GOOD_LINES[4:])
        method = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}
        created = http.post(
            "/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": train, "method": method}
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        deadline = time.time() + 120
        while (status := http.get(f"/fine_tuning/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed"):
            assert time.time() < deadline, f"job still {status}"
            time.sleep(0.3)
        assert status == "succeeded"
        checkpoint = http.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"][0]["id"]
        archive = http.get(f"/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint}/content")
        assert archive.status_code == 200 and archive.content
        assert http.delete(f"/files/{doomed}").json()["deleted"] is True
    return {"train": train, "doomed": doomed, "job": job_id}


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_another_local_user_can_read_nothing_rft_serve_wrote(data_dir: Path, tmp_path: Path, umask: int) -> None:
    port = free_port()
    env = {
        "RFT_DATA_DIR": str(data_dir),
        "RFT_DATABASE_URL": "",
        "RFT_BROKER_URL": "",
        "RFT_TRAINER": "tests.support.trainers:ticking",
        "RFT_TEST_STEPS": "2",
        "RFT_TEST_STEP_SECONDS": "0.05",
        "RFT_TEST_CKPT_EVERY": "1",
    }
    previous = os.umask(umask)  # the server inherits it, as from a careless shell or unit file
    try:
        serve = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    finally:
        os.umask(previous)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serve)
        ids = run_flow(f"http://127.0.0.1:{port}/v1", printed_api_key(serve))
        written = everything_under(data_dir)  # while the server runs: the SQLite -wal and -shm exist
        leaked = readable_by(NOBODY, written)
    finally:
        serve.stop()

    names = {p.relative_to(data_dir).as_posix() for p in written[1:]}
    project_files = next(p for p in names if p.startswith("storage/files/") and p.count("/") == 2)
    expected = {
        "api_key",
        "rft.db",
        "rft.db-wal",
        "rft.db-shm",
        "broker/queue",
        f"{project_files}/{ids['train']}",
        f"storage/checkpoints/{project_files.split('/')[-1]}/{ids['job']}/step-000002/state.json",
    }
    assert expected <= names, f"the flow did not write what this test attacks: {sorted(expected - names)}"
    assert any(n.endswith(".archive/model-v2.tar") for n in names) and any(
        n.endswith(".archive/model-v2.sha256") for n in names
    )
    assert leaked == [], f"uid {NOBODY} could read: {leaked}"
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in written if p.lstat().st_mode & 0o077]
    assert loose == [], f"entries with group/other bits: {loose}"
    assert not any(ids["doomed"] in n for n in names), "a deleted file's bytes stayed on disk"


def test_deleted_upload_leaves_no_bytes_and_a_failed_upload_no_partial(
    tmp_path: Path, client: TestClient, auth: dict[str, str]
) -> None:
    storage_root = tmp_path / "data" / "storage"
    kept = upload(client, auth, jsonl(GOOD_LINES)).json()["id"]
    doomed = upload(client, auth, jsonl(GOOD_LINES)).json()["id"]
    refused = upload(client, auth, b"", "empty.jsonl")
    assert refused.status_code == 400
    assert client.delete(f"/v1/files/{doomed}", headers=auth).json()["deleted"] is True
    on_disk = sorted(p.name for p in storage_root.rglob("*") if p.is_file())
    assert on_disk == [kept], "only the kept upload's bytes may remain (no deleted file, no .partial)"


def test_private_dir_claims_only_folders_it_owns(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    previous = os.umask(0)
    try:
        made = private_dir(shared / "a" / "b", own=False)
        write_private(made / "f", b"x")
        LocalStorage(tmp_path / "store")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755, "an existing folder we do not own keeps its mode"
    assert [stat.S_IMODE(p.stat().st_mode) for p in (shared / "a", made, made / "f")] == [0o700, 0o700, 0o600]
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700


def test_tree_written_by_a_library_is_made_private(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        (tmp_path / "ckpt" / "sub").mkdir(parents=True)
        (tmp_path / "ckpt" / "sub" / "weights.bin").write_bytes(b"w")
    finally:
        os.umask(previous)
    outside = tmp_path / "outside"
    outside.write_bytes(b"o")
    outside.chmod(0o644)
    (tmp_path / "ckpt" / "link").symlink_to(outside)
    make_tree_private(tmp_path / "ckpt")
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in (tmp_path / "ckpt").rglob("*") if not p.is_symlink()}
    assert modes == {"sub": 0o700, "weights.bin": 0o600}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644, "a link's target outside the tree is untouched"


def test_data_folder_owned_by_another_user_is_warned_about_not_fatal(data_dir: Path) -> None:
    mounted = data_dir / "mounted"
    mounted.mkdir()
    mounted.chmod(0o777)  # a root-owned bind mount the service's user may write into
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            private_dir(mounted)
            write_private(private_dir(mounted / "storage") / "f", b"x")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "private_dir raised on a folder it cannot chmod"
    assert stat.S_IMODE(mounted.stat().st_mode) == 0o777
    assert stat.S_IMODE((mounted / "storage").stat().st_mode) == 0o700
    assert stat.S_IMODE((mounted / "storage" / "f").stat().st_mode) == 0o600
