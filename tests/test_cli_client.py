"""The `rft` client commands, run in-process: against the app (TestClient is an `httpx2.Client`) for
files, jobs, events and checkpoints; against `httpx2.MockTransport` servers for the archive download
(its server side is separate) and for chat's SSE stream."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service import cli, cli_client
from service.cli_client import watch
from service.cli_client.api import Api, CliError, normalize_base_url
from service.cli_client.commands import load_grader
from service.core.tables import Job
from service.jobs import repository
from tests.conftest import GOOD_LINES, GRADER, job_body, jsonl

BASE = "http://testserver"
Run = Callable[..., int]


@pytest.fixture
def rft(client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`rft ARGS...` against the app, configured the way a user would: RFT_BASE_URL and RFT_API_KEY."""
    monkeypatch.setenv("RFT_BASE_URL", BASE)
    monkeypatch.setenv("RFT_API_KEY", auth["Authorization"].removeprefix("Bearer "))
    return lambda *argv: cli_client.main(list(argv), http=client)


def api_for(client: TestClient, auth: dict[str, str]) -> Api:
    return Api(BASE, auth["Authorization"].removeprefix("Bearer "), client)


def new_job(client: TestClient, auth: dict[str, str], files: tuple[str, str]) -> str:
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0], files[1]))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def the_job(db_session: Session, job_id: str) -> Job:
    return db_session.query(Job).filter(Job.id == job_id).one()


def add_metrics(db_session: Session, job_id: str, step: int, **data: Any) -> None:
    """A metrics event shaped as JobContext.metrics writes it."""
    job = the_job(db_session, job_id)
    data = {"step": step, "total_steps": 4, **data}
    repository.add_event(db_session, job, f"Step {step}/4", type="metrics", data=data, dedupe_key=f"metrics:{step}")


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"])
def test_base_url_with_or_without_v1_means_the_same_server(raw: str) -> None:
    assert normalize_base_url(raw) == "http://h:8000/v1"


def test_unreachable_server_is_one_line_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["jobs", "list", "--base-url", "http://127.0.0.1:9", "--api-key", "rft-x"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: cannot reach the rft server at http://127.0.0.1:9")
    assert "Traceback" not in err


def test_missing_api_key_says_where_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RFT_API_KEY", raising=False)
    monkeypatch.setenv("RFT_DATA_DIR", str(tmp_path))
    assert cli.main(["jobs", "list", "--base-url", "http://rft.example.com"]) == 1
    assert "no API key: set RFT_API_KEY or pass --api-key" in capsys.readouterr().err


# -- files and jobs against the app ---------------------------------------------------------------


def test_files_upload_prints_the_new_file_id(
    rft: Run, client: TestClient, auth: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(GOOD_LINES))
    assert rft("files", "upload", str(path)) == 0
    file_id = capsys.readouterr().out.strip()
    assert file_id.startswith("file-")
    stored = client.get(f"/v1/files/{file_id}", headers=auth).json()
    assert (stored["filename"], stored["bytes"]) == ("train.jsonl", path.stat().st_size)


def test_jobs_create_uploads_local_files_and_reads_a_yaml_grader(
    rft: Run, client: TestClient, auth: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.jsonl").write_bytes(jsonl(GOOD_LINES[:4]))
    (tmp_path / "valid.jsonl").write_bytes(jsonl(GOOD_LINES[4:]))
    grader = tmp_path / "grader.yaml"
    grader.write_text(
        "type: string_check\nname: exact\ninput: '{{sample.output_text}}'\n"
        "reference: '{{item.answer}}'\noperation: eq\n"
    )
    code = rft(
        "jobs", "create", "--model", "tiny-random-llama", "--grader", str(grader),
        "--training-file", str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "valid.jsonl"),
        "--hyperparameters", '{"n_epochs": 1, "beta": 0.1}', "-p", "n_epochs=2", "-p", "batch_size=auto",
        "--suffix", "math", "--seed", "7", "--metadata", "team=a",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    job = client.get(f"/v1/fine_tuning/jobs/{out.strip()}", headers=auth).json()
    reinforcement = job["method"]["reinforcement"]
    assert reinforcement["grader"] == GRADER
    hyper = reinforcement["hyperparameters"]
    assert (hyper["n_epochs"], hyper["batch_size"], hyper["beta"]) == (2, "auto", 0.1)
    assert (job["seed"], job["user_provided_suffix"], job["metadata"]) == (7, "math", {"team": "a"})
    assert job["training_file"].startswith("file-") and job["validation_file"].startswith("file-")
    assert f"uploaded {tmp_path / 'train.jsonl'} as {job['training_file']}" in err


def test_jobs_create_with_a_bad_grader_file_uploads_nothing(
    rft: Run, client: TestClient, auth: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.jsonl").write_bytes(jsonl(GOOD_LINES))
    (tmp_path / "grader.json").write_text('{"type": "string_check",\n "name": }')
    code = rft("jobs", "create", "--model", "m", "--training-file", str(tmp_path / "train.jsonl"),
               "--grader", str(tmp_path / "grader.json"))  # fmt: skip
    assert code == 1
    assert f"error: {tmp_path / 'grader.json'}:2:10: invalid JSON" in capsys.readouterr().err
    assert client.get("/v1/files", headers=auth).json()["data"] == []


def test_jobs_create_sends_a_response_format_from_a_file_or_inline(
    rft: Run, client: TestClient, auth: dict[str, str], files: tuple[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(GRADER))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    (tmp_path / "format.json").write_text(json.dumps(fmt))
    for given in (str(tmp_path / "format.json"), json.dumps(fmt)):
        code = rft("jobs", "create", "--model", "tiny-random-llama", "--training-file", files[0],
                   "--grader", str(grader), "--response-format", given)  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        job = client.get(f"/v1/fine_tuning/jobs/{out.strip()}", headers=auth).json()
        assert job["method"]["reinforcement"]["response_format"] == fmt
    code = rft("jobs", "create", "--model", "tiny-random-llama", "--training-file", files[0],
               "--grader", str(grader), "--response-format", "{not json")  # fmt: skip
    assert code == 1 and "--response-format is not valid JSON" in capsys.readouterr().err


def test_server_validation_error_prints_message_code_and_param(
    rft: Run, files: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps({**GRADER, "operation": "regex"}))
    code = rft("jobs", "create", "--model", "tiny-random-llama", "--training-file", files[0], "--grader", str(grader))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "(400 " in err and "param: method.reinforcement.grader.operation" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("exact.py", "def grade(sample, item):\n    return 1.0\n", {"type": "python", "name": "exact"}),
        ("g.json", json.dumps({"grader": GRADER}), GRADER),
        ("g.yml", "grader:\n  type: string_check\n  name: x\n", {"type": "string_check", "name": "x"}),
    ],
)
def test_grader_files_in_each_form(tmp_path: Path, name: str, text: str, expected: dict[str, Any]) -> None:
    (tmp_path / name).write_text(text)
    assert load_grader(tmp_path / name).items() >= expected.items()


def test_grader_file_that_is_not_a_grader_is_refused(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("- a\n- b\n")
    with pytest.raises(CliError, match="must hold one grader"):
        load_grader(tmp_path / "g.yaml")


def test_jobs_list_shows_the_job_and_its_status(
    rft: Run, client: TestClient, auth: dict[str, str], files: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = new_job(client, auth, files)
    assert rft("jobs", "list") == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:3] == ["ID", "STATUS", "MODEL"]
    assert row.split()[:3] == [job_id, "validating_files", "tiny-random-llama"]


def test_jobs_list_filters_by_metadata(
    rft: Run, client: TestClient, auth: dict[str, str], files: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    new_job(client, auth, files)
    tagged = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0], metadata={"team": "a"}))
    assert rft("jobs", "list", "--metadata", "team=a") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [tagged.json()["id"]]


def test_jobs_cancel_prints_the_new_status(
    rft: Run, client: TestClient, auth: dict[str, str], files: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = new_job(client, auth, files)
    assert rft("jobs", "cancel", job_id) == 0
    assert capsys.readouterr().out.strip() == f"{job_id} cancelled"


def test_jobs_events_prints_oldest_first_with_metrics(
    rft: Run,
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = new_job(client, auth, files)
    add_metrics(db_session, job_id, 1, train_reward_mean=0.5, kl=0.0123)
    repository.add_event(db_session, the_job(db_session, job_id), "KL is high", level="warn")
    db_session.commit()
    assert rft("jobs", "events", job_id) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Created fine-tuning job" in lines[0]
    assert lines[-2].endswith("Step 1/4  train 0.500  kl 0.0123")
    assert "warn   KL is high" in lines[-1]


def test_unknown_job_prints_the_server_message_and_exits_1(rft: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert rft("jobs", "watch", "ftjob-nope") == 1
    err = capsys.readouterr().err
    assert err == "error: No such fine-tuning job: ftjob-nope (404 not_found, param: fine_tuning_job_id)\n"


def test_watch_follows_a_job_until_it_succeeds(
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = new_job(client, auth, files)
    repository.transition(db_session, job_id, ["validating_files"], status="running", estimated_finish=time.time() + 90)
    add_metrics(db_session, job_id, 1, train_reward_mean=0.25, kl=0.001)
    db_session.commit()
    later = [2]

    def training_goes_on(_: float) -> None:
        if later:  # between two polls: a step with an evaluation, a warning, and the end
            add_metrics(db_session, job_id, later.pop(), train_reward_mean=0.5, valid_reward_mean=0.75, kl=0.002)
            repository.add_event(db_session, the_job(db_session, job_id), "entropy is collapsing", level="warn")
            repository.transition(db_session, job_id, ["running"], status="succeeded", fine_tuned_model="ft:m:x::y")
            db_session.commit()

    assert watch.watch(api_for(client, auth), job_id, sleep=training_goes_on) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "status: running"
    assert lines[1].startswith("step 1/4   25%  ETA 1m") and lines[1].endswith("train 0.250  valid -  kl 0.0010")
    assert lines[2:] == [
        "status: succeeded",
        "step 2/4   50%  ETA --  train 0.500  valid 0.750  kl 0.0020",
        "succeeded: ft:m:x::y",
    ]
    assert "warn   entropy is collapsing" in err


def test_watch_on_a_tty_redraws_one_progress_line(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session, monkeypatch: Any
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    job_id = new_job(client, auth, files)
    add_metrics(db_session, job_id, 3, train_reward_mean=0.5, valid_reward_mean=0.625, kl=0.01)
    repository.transition(db_session, job_id, ["validating_files"], status="succeeded", fine_tuned_model="ft:z")
    db_session.commit()
    screen = Terminal()
    monkeypatch.setattr("sys.stdout", screen)
    monkeypatch.setenv("COLUMNS", "120")
    assert watch.watch(api_for(client, auth), job_id) == 0
    drawn, final, _ = screen.getvalue().split("\n")
    assert drawn == (
        "\rsucceeded [###############.....] step 3/4   75%  ETA --  train 0.500  valid 0.625  kl 0.0100\x1b[K"
    )
    assert final == "succeeded: ft:z"


def test_watch_line_drops_the_bar_on_a_narrow_terminal() -> None:
    progress = watch.Progress(status="running", step=1, total=4, train=0.5)
    assert progress.line(0, 200).startswith("running [#####...............] step 1/4")
    assert progress.line(0, 60).startswith("running step 1/4   25%")


class Flaky(httpx2.BaseTransport):
    """Refuses the first `failures` connections, then hands requests to `inner`."""

    def __init__(self, inner: httpx2.BaseTransport, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if self.failures:
            self.failures -= 1
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        return self.inner.handle_request(request)


def test_watch_rides_out_a_server_restart(
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = new_job(client, auth, files)
    repository.transition(db_session, job_id, ["validating_files"], status="succeeded", fine_tuned_model="ft:z")
    db_session.commit()
    monkeypatch.setattr(client, "_transport", Flaky(client._transport, failures=3))  # the SDK retries twice
    assert watch.watch(api_for(client, auth), job_id, sleep=lambda _: None) == 0
    out, err = capsys.readouterr()
    assert err == f"lost the connection to {BASE}/v1; retrying\n"
    assert out.endswith("succeeded: ft:z\n")


def test_events_follow_prints_new_events_until_the_job_ends(
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = new_job(client, auth, files)
    repository.transition(db_session, job_id, ["validating_files"], status="running")
    db_session.commit()
    later = ["Training finished"]

    def job_ends(_: float) -> None:
        if later:
            repository.add_event(db_session, the_job(db_session, job_id), later.pop())
            repository.transition(db_session, job_id, ["running"], status="succeeded")
            db_session.commit()

    assert watch.events(api_for(client, auth), job_id, limit=1, follow=True, sleep=job_ends) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "Validating training file" in lines[0] and lines[1].endswith("info   Training finished")


def test_watch_of_a_failed_job_prints_its_error_and_exits_1(
    rft: Run,
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = new_job(client, auth, files)
    error = {"code": "invalid_file", "message": "line 3: 'messages' is missing", "param": "training_file"}
    repository.add_event(db_session, the_job(db_session, job_id), error["message"], level="error")
    repository.transition(db_session, job_id, ["validating_files"], status="failed", error=error)
    db_session.commit()
    assert rft("jobs", "watch", job_id) == 1
    err = capsys.readouterr().err  # the failure's own error event is not repeated above it
    assert err == f"error: job {job_id} failed: line 3: 'messages' is missing (invalid_file, param: training_file)\n"


def test_checkpoints_list_shows_steps_and_validation_rewards(
    rft: Run,
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    db_session: Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.core.ids import new_id
    from service.core.tables import Checkpoint

    job_id = new_job(client, auth, files)
    job = the_job(db_session, job_id)
    db_session.add(
        Checkpoint(
            id=new_id("ftckpt-"),
            project_id=job.project_id,
            job_id=job_id,
            step_number=4,
            fine_tuned_model_checkpoint="ft:m:x::y:ckpt-step-4",
            metrics={"valid_reward_mean": 0.875, "valid_kl": 0.0312},
            storage_key="checkpoints/4",
        )
    )
    db_session.commit()
    assert rft("checkpoints", "list", job_id) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1:] == ["4", "0.875", "0.0312", "ft:m:x::y:ckpt-step-4"]


# -- downloads against a fake archive server -------------------------------------------------------


def archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MODEL = archive({"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 1000})


class Severed(httpx2.SyncByteStream):
    """A body whose connection drops after `keep` bytes."""

    def __init__(self, body: bytes, keep: int) -> None:
        self.body, self.keep = body, keep

    def __iter__(self) -> Iterator[bytes]:
        yield self.body[: self.keep]
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")


class ArchiveServer:
    """The download contract: ETag = sha256, X-Checksum-SHA256, `Range: bytes=N-` honoured under If-Range."""

    def __init__(self, content: bytes = MODEL, *, checksum: str | None = None, sever_at: int | None = None) -> None:
        self.content, self.sha256 = content, hashlib.sha256(content).hexdigest()
        self.checksum, self.sever_at = checksum or self.sha256, sever_at
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != "Bearer rft-k":
            return httpx2.Response(401, json={"error": {"message": "Incorrect API key provided.", "code": "x"}})
        etag, size = f'"{self.sha256}"', len(self.content)
        headers = {"ETag": etag, "X-Checksum-SHA256": self.checksum, "Accept-Ranges": "bytes"}
        start, status = 0, 200
        wanted = request.headers.get("Range")
        if wanted and request.headers.get("If-Range", etag) == etag:
            start, status = int(wanted.removeprefix("bytes=").removesuffix("-")), 206
            if start >= size:
                return httpx2.Response(416, headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        body = self.content[start:]
        headers["Content-Length"] = str(len(body))
        if self.sever_at is not None:
            keep, self.sever_at = self.sever_at, None
            return httpx2.Response(status, headers=headers, stream=Severed(body, keep))
        return httpx2.Response(status, headers=headers, content=body)


def download(server: ArchiveServer, *argv: str) -> int:
    http = httpx2.Client(transport=httpx2.MockTransport(server))
    flags = ["--base-url", "http://rft.test", "--api-key", "rft-k"]
    return cli_client.main(["checkpoints", "download", *argv, *flags], http=http)


def test_download_verifies_renames_and_extracts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, out = ArchiveServer(), tmp_path / "model.tar"
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out), "--extract", str(tmp_path / "model")) == 0
    assert out.read_bytes() == MODEL
    assert not (tmp_path / "model.tar.part").exists() and not (tmp_path / "model.tar.part.etag").exists()
    assert (tmp_path / "model" / "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert server.requests[0].url.path == "/v1/fine_tuning/jobs/ftjob-1/checkpoints/ftckpt-2/content"
    assert f"sha256 {server.sha256}" in capsys.readouterr().err


def test_download_of_the_final_merged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = ArchiveServer()
    assert download(server, "ftjob-1", "--merged") == 0
    assert (tmp_path / "ftjob-1-merged.tar").read_bytes() == MODEL
    assert server.requests[0].url.path == "/v1/fine_tuning/jobs/ftjob-1/content"
    assert server.requests[0].url.params["merged"] == "true"


def test_severed_download_keeps_the_part_and_resumes_with_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, out = ArchiveServer(sever_at=100_000), tmp_path / "model.tar"
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out)) == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (tmp_path / "model.tar.part").stat().st_size == 100_000 and not out.exists()
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out)) == 0
    assert out.read_bytes() == MODEL
    resumed = server.requests[-1].headers
    assert (resumed["Range"], resumed["If-Range"]) == ("bytes=100000-", f'"{server.sha256}"')


def test_partial_of_a_changed_archive_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "model.tar"
    (tmp_path / "model.tar.part").write_bytes(b"bytes of an older archive")
    (tmp_path / "model.tar.part.etag").write_text('"0123"')
    server = ArchiveServer()
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out)) == 0
    assert server.requests[0].headers["If-Range"] == '"0123"'  # asked, and got a 200 with everything
    assert out.read_bytes() == MODEL


def test_partial_longer_than_the_archive_starts_over(tmp_path: Path) -> None:
    server, out = ArchiveServer(), tmp_path / "model.tar"
    (tmp_path / "model.tar.part").write_bytes(MODEL + b"trailing junk")
    (tmp_path / "model.tar.part.etag").write_text(f'"{server.sha256}"')
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out)) == 0
    assert [r.headers.get("Range") for r in server.requests] == [f"bytes={len(MODEL) + 13}-", None]
    assert out.read_bytes() == MODEL


def test_partial_without_its_etag_is_not_resumed(tmp_path: Path) -> None:
    server, out = ArchiveServer(), tmp_path / "model.tar"
    (tmp_path / "model.tar.part").write_bytes(b"of unknown origin")
    assert download(server, "ftjob-1", "ftckpt-2", "-o", str(out)) == 0
    assert "Range" not in server.requests[0].headers
    assert out.read_bytes() == MODEL


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.tar"
    assert download(ArchiveServer(checksum="f" * 64), "ftjob-1", "ftckpt-2", "-o", str(out)) == 1
    assert "error: checksum mismatch for model.tar" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/rft-absolute.txt", "a/../../escaped.txt"])
def test_extract_refuses_members_outside_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], evil: str
) -> None:
    server = ArchiveServer(archive({"config.json": b"{}", evil: b"owned"}))
    code = download(server, "ftjob-1", "ftckpt-2", "-o", str(tmp_path / "m.tar"), "--extract", str(tmp_path / "m"))
    assert code == 1
    assert f"unsafe member {evil!r}; nothing was extracted" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "escaped.txt").exists()


def test_download_error_prints_the_server_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    http = httpx2.Client(transport=httpx2.MockTransport(ArchiveServer()))
    argv = ["checkpoints", "download", "ftjob-1", "-o", str(tmp_path / "m.tar"), "--api-key", "wrong"]
    assert cli_client.main([*argv, "--base-url", "http://rft.test"], http=http) == 1
    assert capsys.readouterr().err.strip() == "error: Incorrect API key provided. (401 x)"


# -- chat against a fake SSE server -----------------------------------------------------------------


class ChatServer:
    """Answers every chat completion with the next canned reply, streamed as OpenAI's SSE chunks."""

    def __init__(self, *replies: str) -> None:
        self.replies, self.bodies = list(replies), list[dict[str, Any]]()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] == "ft:missing":
            error = {"message": "The model 'ft:missing' does not exist.", "code": "model_not_found", "param": "model"}
            return httpx2.Response(404, json={"error": error})
        reply, chunks = self.replies.pop(0), []
        for piece in [reply[: len(reply) // 2], reply[len(reply) // 2 :]]:
            delta = {"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            chunks.append(f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n")
        stream = "".join(chunks) + "data: [DONE]\n\n"
        return httpx2.Response(200, headers={"Content-Type": "text/event-stream"}, content=stream.encode())


def chat(server: ChatServer, *argv: str) -> int:
    http = httpx2.Client(transport=httpx2.MockTransport(server))
    return cli_client.main(["chat", *argv, "--base-url", "http://rft.test/v1", "--api-key", "rft-k"], http=http)


def test_chat_one_shot_streams_the_reply(capsys: pytest.CaptureFixture[str]) -> None:
    server = ChatServer("Twelve.")
    code = chat(server, "ft:m:x::y", "-m", "7 + 5?", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "8")
    assert code == 0
    assert capsys.readouterr().out == "Twelve.\n"
    assert server.bodies == [
        {
            "model": "ft:m:x::y",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 + 5?"}],
            "stream": True,
            "temperature": 0.0,
            "max_completion_tokens": 8,
        }
    ]


def test_chat_reads_turns_from_stdin_and_keeps_the_history(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nand again\n/reset\nfresh\n"))
    server = ChatServer("Hello!", "Hello again!", "New start.")
    assert chat(server, "ft:m:x::y") == 0
    assert capsys.readouterr().out == "Hello!\nHello again!\nNew start.\n"
    assert [m["content"] for m in server.bodies[1]["messages"]] == ["hi", "Hello!", "and again"]
    assert [m["content"] for m in server.bodies[2]["messages"]] == ["fresh"]


def test_chat_with_an_unknown_model_prints_the_server_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert chat(ChatServer(), "ft:missing", "-m", "hi") == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: The model 'ft:missing' does not exist. (404 model_not_found, param: model)"
