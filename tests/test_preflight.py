"""The pre-flight (`POST /v1/fine_tuning/jobs/preflight`, `rft jobs create --dry-run`): the checks of
creation and the files' line-by-line validation, the hyperparameters as the worker resolves them,
steps, tokens (the model's tokenizer where its files are here) and a time from measured throughput;
nothing is created."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import cli_client
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Job, Throughput
from service.fleet import repository as fleet
from service.fleet.throughput import device_name
from service.jobs.schemas import RftHyperparameters
from service.models.tokens import estimate as estimate_tokens
from tests.conftest import GOOD_LINES, GRADER, job_body, jsonl, upload
from tests.support import chaos
from workers import runner, validate
from workers.rl.config import resolve, with_engine

H100 = "NVIDIA H100 80GB HBM3"
LINES: list[Any] = GOOD_LINES


def preflight(client: TestClient, auth: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/fine_tuning/jobs/preflight", headers=auth, json=body)


def test_preflight_resolves_as_the_worker_counts_steps_and_tokens_and_creates_nothing(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    response = preflight(client, auth, job_body(*files))
    assert response.status_code == 200, response.text
    p = response.json()
    hp = RftHyperparameters().model_dump(mode="json")  # what the API stores for a request with none
    cfg = with_engine(resolve(hp, 4), "torch", True)
    assert p["hyperparameters"] == cfg.echo() | {"max_wall_seconds": None, "max_tokens": None}
    assert (p["total_steps"], p["steps_per_epoch"]) == (cfg.total_steps, cfg.steps_per_epoch) == (3, 1)
    assert p["evaluations"] == 1 + len({s for s in range(1, 4) if s % cfg.eval_interval == 0} | {3})
    assert p["training_file"] == {"id": files[0], "examples": 4}
    assert p["grader"] == {"type": "string_check", "name": "exact"}
    tokens = p["tokens"]
    prompts = sum(estimate_tokens(line["messages"]) for line in LINES[:4])
    assert tokens["counted_with"] == "estimate"
    assert tokens["prompt"] == cfg.n_epochs * cfg.group_size * prompts
    assert tokens["completion_at_most"] == cfg.n_epochs * 4 * cfg.group_size * cfg.max_completion_tokens
    assert tokens["trained_at_most"] == tokens["prompt"] + tokens["completion_at_most"]
    assert p["estimate"]["seconds"] is None and p["estimate"]["basis"].startswith("no measurement yet")
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []


def test_preflight_counts_prompt_tokens_with_the_models_own_tokenizer(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], tmp_path: Path
) -> None:
    from service.models.registry import tiny_llama
    from service.models.templates import render_prompt

    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    p = preflight(client, auth, job_body(*files, model=str(tmp_path / "m"))).json()
    measured = sum(
        len(tokenizer(render_prompt(tokenizer, line["messages"]), add_special_tokens=False).input_ids)
        for line in LINES[:4]
    )
    group, epochs = p["hyperparameters"]["group_size"], p["hyperparameters"]["n_epochs"]
    assert p["tokens"]["counted_with"] == "tokenizer"
    assert p["tokens"]["prompt"] == epochs * group * measured
    assert p["memory_peak_bytes"] > 0 and "GiB" in p["memory_plan"]


def test_preflight_refuses_a_bad_line_as_the_validating_stage_would(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    bad = jsonl(GOOD_LINES[:2]) + b'{"messages": []}\n' + jsonl(GOOD_LINES[2:4])
    file_id = upload(live_client, live_auth, bad).json()["id"]
    response = preflight(live_client, live_auth, job_body(file_id))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "training_file" and "line 3" in error["message"]
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=job_body(file_id)).json()["id"]
    validate.validate_job(job_id, live_settings)
    with unit_of_work(live_settings) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert job.status == "failed" and job.error is not None
        assert job.error["message"] == error["message"]


def test_preflight_of_another_projects_file_is_refused_as_creation_is(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], files: tuple[str, str]
) -> None:
    theirs = preflight(client, other_auth, job_body(*files))
    missing = preflight(client, other_auth, job_body("file-missing"))
    assert theirs.status_code == missing.status_code == 400
    assert theirs.json()["error"]["param"] == "training_file"
    assert theirs.json()["error"]["message"].replace(files[0], "X") == missing.json()["error"]["message"].replace(
        "file-missing", "X"
    )


def _worker(session: Session, name: str, device: str) -> None:
    fleet.report(
        session,
        name,
        time.time(),
        hostname=name,
        queues=["training"],
        device_type="cuda",
        device_count=1,
        device_memory_bytes=80 * 2**30,
        engines=["torch"],
        device_name=device,
        trackers=["wandb", "mlflow"],
    )


def _figure(session: Session, device: str, per_sequence: float, per_eval: float | None, updated: float) -> None:
    session.add(
        Throughput(
            model="tiny-random-llama",
            device=device,
            mode="full",
            steps=12,
            seconds_per_sequence=per_sequence,
            eval_seconds_per_sequence=per_eval,
            max_completion_tokens=64,
            tokens_per_second=100.0,
            updated_at=updated,
        )
    )
    session.flush()


def test_the_time_estimate_uses_the_throughput_of_the_worker_class_that_would_run_the_job(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    _figure(db_session, "cpu x2", 9.0, None, time.time())  # fresher, but no live worker has that device
    _figure(db_session, H100, 0.5, 0.25, time.time() - 60)
    _worker(db_session, "gpu:1", H100)
    p = preflight(client, auth, job_body(*files)).json()
    hp = p["hyperparameters"]
    sequences = hp["batch_size"] * hp["group_size"]
    expected = p["total_steps"] * sequences * 0.5 + p["evaluations"] * 1 * hp["eval_samples"] * 0.25
    assert p["estimate"]["device"] == H100
    assert p["estimate"]["seconds"] == pytest.approx(expected)
    assert "over the last 12 training steps" in p["estimate"]["basis"]

    body = job_body(*files)
    body["method"]["reinforcement"]["hyperparameters"] = {"max_completion_tokens": 128, "max_wall_seconds": 1}
    longer = preflight(client, auth, body).json()
    assert longer["estimate"]["seconds"] == pytest.approx(2 * expected)
    assert "scaled linearly to 128" in longer["estimate"]["basis"]
    assert any("max_wall_seconds 1 is below the estimated" in w for w in longer["warnings"])


def test_without_a_reporting_fleet_the_freshest_figure_is_used_and_said_so(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], db_session: Session
) -> None:
    _figure(db_session, H100, 0.5, 0.25, time.time() - 60)
    _figure(db_session, "cpu x2", 2.0, 1.0, time.time())
    p = preflight(client, auth, job_body(*files)).json()
    assert p["estimate"]["device"] == "cpu x2" and "the fleet reports no workers" in p["estimate"]["basis"]


def test_a_real_run_records_the_throughput_the_next_preflight_estimates_from(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    file_id = upload(live_client, live_auth, chaos.PROMPTS).json()["id"]
    body = chaos.job_body(file_id)
    body["method"]["reinforcement"]["hyperparameters"] = {**chaos.HYPER, "n_epochs": 3}
    before = preflight(live_client, live_auth, body).json()
    assert before["estimate"]["seconds"] is None
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=body).json()["id"]
    validate.validate_job(job_id, live_settings)
    runner.run_job(job_id, live_settings)
    with unit_of_work(live_settings) as session:
        [figure] = session.scalars(select(Throughput)).all()
        assert (figure.model, figure.device, figure.mode, figure.steps) == (
            "tiny-random-llama",
            device_name(None),
            "full",
            3,
        )
        assert figure.seconds_per_sequence > 0 and figure.eval_seconds_per_sequence is not None
    after = preflight(live_client, live_auth, body).json()
    assert after["estimate"]["device"] == device_name(None)
    assert math.isfinite(after["estimate"]["seconds"]) and after["estimate"]["seconds"] > 0
    assert after["total_steps"] == 3


def test_rft_jobs_create_dry_run_prints_the_preflight_and_creates_no_job(
    client: TestClient, auth: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("RFT_BASE_URL", "http://testserver")
    monkeypatch.setenv("RFT_API_KEY", auth["Authorization"].removeprefix("Bearer "))
    (tmp_path / "train.jsonl").write_bytes(jsonl(GOOD_LINES[:4]))
    (tmp_path / "grader.json").write_text(json.dumps(GRADER))
    argv = ["jobs", "create", "--dry-run", "--model", "tiny-random-llama", "--grader", str(tmp_path / "grader.json")]
    argv += ["--training-file", str(tmp_path / "train.jsonl"), "-p", "max_tokens=100"]
    assert cli_client.main(argv, http=client) == 0
    out = capsys.readouterr().out
    assert "dry run: tiny-random-llama would train; nothing was created" in out
    assert "steps:        3 (3 epochs x 1)" in out and "(estimate)" in out
    assert "time:         unknown (no measurement yet" in out
    assert "warning: max_tokens 100 is below" in out
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []
    bad = [*argv[:-2], "-p", "max_tokens=0"]
    assert cli_client.main(bad, http=client) == 1
    assert "max_tokens" in capsys.readouterr().err
