"""Experiment tracking: a job's `integrations` log every step, the resolved hyperparameters, the
evaluation samples and the final selection to W&B (offline here: the run folder is read back) and to
a real MLflow tracking server; a tracker that fails never fails the job; integration objects are
checked at creation."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.app import create_app
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Job, JobEvent, JobMetric
from service.fleet import repository as fleet
from tests.conftest import job_body, submit, upload
from tests.support import chaos, wandb_file
from tests.support.procs import free_port
from workers import runner, validate

HYPER = {**chaos.HYPER, "n_epochs": 3}  # 3 steps, evaluated at 2 and 3


@pytest.fixture(autouse=True)
def wandb_stays_local(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B's service process outlives a run and keeps the settings it started with: each test starts
    its own, and none may reach for W&B's cloud (a closed local port answers in its place)."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")

    def teardown() -> None:
        stop = getattr(sys.modules.get("wandb"), "teardown", None)  # None where a test hid the package
        if stop is not None:
            stop()

    teardown()
    yield
    teardown()


def needs(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: pip install 'rft[trackers]' (make install does)")


def run_rl_job(client: TestClient, auth: dict[str, str], settings: Settings, integrations: list[Any]) -> str:
    """A 3-step RL job of the tiny model with `integrations`, run to its end in this process."""
    file_id = upload(client, auth, chaos.PROMPTS).json()["id"]
    body = chaos.job_body(file_id) | {"integrations": integrations}
    body["method"]["reinforcement"]["hyperparameters"] = HYPER
    job_id = submit(client, auth, settings, body)
    runner.run_job(job_id, settings)
    return job_id


def stored(settings: Settings, job_id: str) -> tuple[Job, list[dict[str, Any]], list[JobEvent]]:
    with unit_of_work(settings) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
        return job, [{**m.data, "step": m.step} for m in metrics], list(events)


def test_wandb_offline_run_folder_holds_every_step_the_config_samples_and_final_selection(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path, monkeypatch: Any
) -> None:
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = {"project": "rft-tests", "name": "tiny run", "tags": ["ci", "tiny"]}
    job_id = run_rl_job(live_client, live_auth, live_settings, [{"type": "wandb", "wandb": wandb}])
    job, metrics, events = stored(live_settings, job_id)
    assert job.status == "succeeded", job.error

    [folder] = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{job_id}")
    run_file = folder / f"run-{job_id}.wandb"
    steps = wandb_file.history(run_file)
    assert sorted(steps) == [1, 2, 3]
    for m in metrics:
        row = steps[m["step"]]
        assert row["train_reward_mean"] == pytest.approx(m["train_reward_mean"])
        assert row["timing/step/full_iteration"] == pytest.approx(m["timing"]["step"]["full_iteration"])
        assert row["scores/graders/close/train_reward_mean"] == pytest.approx(m["train_reward_mean"])
    for step in (2, 3):  # the evaluated steps carry the samples as a table
        assert steps[step]["valid_samples/_type"] == "table-file"
        table = json.loads((folder / "files" / steps[step]["valid_samples/path"]).read_text())
        assert table["columns"] == ["step", "prompt", "completion", "reward", "errors", "scores"]
        samples = metrics[step - 1]["valid_samples"]
        assert [row[2] for row in table["data"]] == [s["completion"] for s in samples]
    assert "valid_samples/_type" not in steps[1]

    config = wandb_file.config(run_file)
    assert config["job_id"] == job_id
    resolved = job.method["reinforcement"]["hyperparameters"]
    assert config["hyperparameters"]["micro_batch_size"] == resolved["micro_batch_size"] != "auto"
    assert config["hyperparameters"]["batch_size"] == 4
    final = next(e.data or {} for e in events if e.message.startswith("Final model"))
    summary = wandb_file.summary(run_file)
    assert summary["final/chosen_step"] == final["chosen_step"]
    assert summary["final/fine_tuned_model"] == job.fine_tuned_model

    note = next(e for e in events if "logged offline" in e.message)
    assert f"wandb sync {folder}" in note.message and note.level == "info"
    synced = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "wandb"), "sync", "--dry-run", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert "Would sync 1 run(s)" in synced.stdout + synced.stderr


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (the dev extra's `mlflow`), SQLite and local artifacts."""
    needs("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    argv = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'db.sqlite'}"]
    argv += ["--artifacts-destination", str(folder / "artifacts")]
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        chaos.wait_for("the MLflow server", lambda: _healthy(url), timeout=120, every=0.25)
        yield url
    finally:  # the server and its uvicorn worker: the session it leads
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_mlflow_run_on_a_real_server_holds_every_step_params_samples_and_selection(
    live_settings: Settings, live_auth: dict[str, str], mlflow_server: str, sent_tasks: list[Any]
) -> None:
    from mlflow.tracking import MlflowClient

    settings = live_settings.model_copy(update={"mlflow_tracking_uris": [mlflow_server]})
    mlflow = {"tracking_uri": mlflow_server, "experiment": "rft-tests", "run_name": "tiny", "tags": ["ci"]}
    with TestClient(create_app(settings)) as client:
        job_id = run_rl_job(client, live_auth, settings, [{"type": "mlflow", "mlflow": mlflow}])
    job, metrics, events = stored(settings, job_id)
    assert job.status == "succeeded", job.error

    tracking = MlflowClient(mlflow_server)
    experiment = tracking.get_experiment_by_name("rft-tests")
    assert experiment is not None
    [run] = tracking.search_runs([experiment.experiment_id], filter_string=f"tags.`rft.job_id` = '{job_id}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and "ci" in run.data.tags
    history = tracking.get_metric_history(run.info.run_id, "train_reward_mean")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["train_reward_mean"])) for m in metrics]
    assert [h.step for h in tracking.get_metric_history(run.info.run_id, "timing/step/sampling")] == [1, 2, 3]
    resolved = job.method["reinforcement"]["hyperparameters"]
    assert run.data.params["hyperparameters/micro_batch_size"] == str(resolved["micro_batch_size"])
    assert run.data.params["hyperparameters/batch_size"] == "4"
    samples = [a.path for a in tracking.list_artifacts(run.info.run_id, "valid_samples")]
    assert samples == ["valid_samples/step_000002.json", "valid_samples/step_000003.json"]
    final = next(e.data or {} for e in events if e.message.startswith("Final model"))
    assert run.data.metrics["final/chosen_step"] == final["chosen_step"]
    assert run.data.tags["rft.fine_tuned_model"] == job.fine_tuned_model
    assert any(run.info.run_id in e.message for e in events if e.level == "info")


def test_trackers_that_fail_warn_and_the_job_still_succeeds(
    live_settings: Settings, live_auth: dict[str, str], sent_tasks: list[Any], monkeypatch: Any
) -> None:
    """The wandb package missing and an MLflow server that does not answer: two warn events, one each,
    and the job trains to its end."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("RFT_TEST_STEPS", "3")
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "0")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = live_settings.model_copy(
        update={"mlflow_tracking_uris": [dead], "trainer": "tests.support.trainers:ticking"}
    )
    integrations = [
        {"type": "wandb", "wandb": {"project": "p"}},
        {"type": "mlflow", "mlflow": {"tracking_uri": dead, "experiment": "e"}},
    ]
    with TestClient(create_app(settings)) as client:
        file_id = upload(client, live_auth, chaos.PROMPTS).json()["id"]
        response = client.post(
            "/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id, integrations=integrations)
        )
        assert response.status_code == 200, response.text
        job_id = response.json()["id"]
    validate.validate_job(job_id, settings)
    started = time.monotonic()
    runner.run_job(job_id, settings)
    job, metrics, events = stored(settings, job_id)
    assert job.status == "succeeded" and [m["step"] for m in metrics] == [1, 2, 3]
    warnings = [e.message for e in events if e.level == "warn"]
    assert len(warnings) == 2, warnings
    assert "Weights & Biases tracking failed while starting: ModuleNotFoundError" in warnings[0]
    assert "pip install 'rft[trackers]'" in warnings[0]
    assert warnings[1].startswith("MLflow tracking failed while starting:")
    assert "Training continues without it." in warnings[1]
    assert time.monotonic() - started < 60  # an unreachable server is given up on, not waited for


class RefusingWandb(http.server.BaseHTTPRequestHandler):
    """A W&B server that refuses every key, as api.wandb.ai does a wrong one."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": ["invalid api key"]}')

    do_GET = do_POST

    def log_message(self, *args: Any) -> None:
        pass


def test_wandb_credentials_refused_warn_and_the_job_still_succeeds(
    live_settings: Settings, live_auth: dict[str, str], sent_tasks: list[Any], monkeypatch: Any
) -> None:
    needs("wandb")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # online, with a key the server refuses
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("RFT_TEST_STEPS", "2")
    monkeypatch.setenv("RFT_TEST_STEP_SECONDS", "0")
    settings = live_settings.model_copy(update={"trainer": "tests.support.trainers:ticking"})
    try:
        with TestClient(create_app(settings)) as client:
            file_id = upload(client, live_auth, chaos.PROMPTS).json()["id"]
            body = job_body(file_id, integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
            job_id = client.post("/v1/fine_tuning/jobs", headers=live_auth, json=body).json()["id"]
        validate.validate_job(job_id, settings)
        runner.run_job(job_id, settings)
    finally:
        server.shutdown()
    job, metrics, events = stored(settings, job_id)
    assert job.status == "succeeded" and len(metrics) == 2
    [warning] = [e.message for e in events if e.level == "warn"]
    assert "Weights & Biases tracking failed while starting" in warning and "invalid api key" in warning


BAD_INTEGRATIONS = [
    ([{"type": "neptune", "neptune": {}}], "integrations.0.type"),
    ([{"type": "wandb", "wandb": {"name": "x"}}], "integrations.0.wandb.project"),
    ([{"type": "wandb"}], "integrations.0"),
    ([{"type": "wandb", "wandb": {"project": "p"}, "mlflow": {"experiment": "e"}}], "integrations.0"),
    ([{"type": "mlflow", "mlflow": {"run_name": "r"}}], "integrations.0.mlflow.experiment"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": "not-a-list"}}], "integrations.0.wandb.tags"),
]


@pytest.mark.parametrize(("integrations", "param"), BAD_INTEGRATIONS)
def test_bad_integration_objects_are_400_naming_the_field(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], integrations: Any, param: str
) -> None:
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0], integrations=integrations))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "uri", ["http://169.254.169.254/latest", "http://127.0.0.1:6379", "file:///etc", "http://localhost:5000"]
)
def test_a_tracking_uri_the_operator_did_not_allow_is_refused(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], uri: str
) -> None:
    """A tenant cannot make the workers POST a job's metrics to an address of its choosing."""
    mlflow = {"tracking_uri": uri, "experiment": "e"}
    body = job_body(files[0], integrations=[{"type": "mlflow", "mlflow": mlflow}])
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "integrations.0.mlflow.tracking_uri"
    assert "RFT_MLFLOW_TRACKING_URIS" in response.json()["error"]["message"]


def test_integrations_are_stored_in_openais_shape_and_announced(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    wandb = {"project": "p", "entity": "team", "name": "run", "tags": ["a"]}
    body = job_body(
        files[0], integrations=[{"type": "wandb", "wandb": wandb}, {"type": "mlflow", "mlflow": {"experiment": "e"}}]
    )
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()
    assert job["integrations"] == [
        {"type": "wandb", "wandb": wandb},
        {"type": "mlflow", "mlflow": {"tracking_uri": None, "experiment": "e", "run_name": None, "tags": None}},
    ]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert {"Logging to Weights & Biases once training starts.", "Logging to MLflow once training starts."} <= {
        e["message"] for e in events
    }


def _report_worker(session: Session, trackers: list[str] | None) -> None:
    fleet.report(
        session,
        "host:1",
        time.time(),
        hostname="host",
        queues=["training"],
        device_type="cpu",
        device_count=1,
        device_memory_bytes=64 * 2**30,
        engines=["torch"],
        device_name="cpu x2",
        trackers=trackers,
    )


def test_a_tracker_no_live_worker_has_is_refused_naming_the_extra(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    _report_worker(db_session, ["wandb"])
    wandb = job_body(files[0], integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=wandb).status_code == 200
    mlflow = job_body(files[0], integrations=[{"type": "mlflow", "mlflow": {"experiment": "e"}}])
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=mlflow)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "integrations.0.type" and "rft[trackers]" in error["message"]


def test_workers_that_do_not_report_trackers_are_not_held_against_a_job(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    _report_worker(db_session, None)  # a worker of an older version: the job's worker warns if it must
    body = job_body(files[0], integrations=[{"type": "mlflow", "mlflow": {"experiment": "e"}}])
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=body).status_code == 200
