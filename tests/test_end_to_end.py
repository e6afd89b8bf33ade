"""The whole flow through the official `openai` SDK against real processes: the API server,
Celery workers on PostgreSQL + Redis, and the embedded `rft serve` (SQLite, filesystem broker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from celery import Celery

from tests.conftest import GOOD_LINES, GRADER, jsonl
from tests.support import services
from tests.support.procs import Proc, free_port, pids_with_env, printed_api_key, wait_healthy
from tests.support.receiver import Receiver

QUEUES = {"workers.tasks.run_job": "training", "workers.tasks.validate_job": "light"}
TERMINAL = {"succeeded", "failed", "cancelled"}
METHOD: Any = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}


def poll(client: openai.OpenAI, job_id: str, until: set[str], timeout: float = 90) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def upload_pair(client: openai.OpenAI, tmp_path: Path) -> tuple[str, str]:
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_bytes(jsonl(GOOD_LINES[:4]))
    valid.write_bytes(jsonl(GOOD_LINES[4:]))
    with open(train, "rb") as t, open(valid, "rb") as v:
        return client.files.create(file=t, purpose="fine-tune").id, client.files.create(file=v, purpose="fine-tune").id


@pytest.fixture
def production_stack(tmp_path: Path, pg_server: str, redis_server: str) -> Iterator[dict[str, Any]]:
    """API server + a light worker (with the reaper) + a training worker on PostgreSQL and Redis."""
    database = services.create_database(pg_server, "rft_e2e")
    broker = f"{redis_server}/{os.getpid() % 14 + 1}"
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    env = {
        "RFT_DATA_DIR": str(tmp_path / "data"),
        "RFT_DATABASE_URL": database,
        "RFT_BROKER_URL": broker,
        "RFT_TRAINER": "tests.support.trainers:ticking",
        "RFT_TEST_STEPS": "8",
        "RFT_TEST_STEP_SECONDS": "0.4",
        "RFT_LEASE_SECONDS": "3",
        "RFT_HEARTBEAT_SECONDS": "0.5",
        "RFT_REAPER_INTERVAL_SECONDS": "1",
        "RFT_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.1/32"]',  # the tests' receivers
        "RFT_WEBHOOK_BACKOFF_SECONDS": "0.5",
    }
    procs: list[Proc] = []

    def start(name: str, *argv: str) -> Proc:
        proc = Proc(list(argv), env, tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    api = start("api", "serve", "--no-workers", "--port", str(port))
    wait_healthy(f"http://127.0.0.1:{port}", api)
    key = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--project", "e2e"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    start("light", "worker", "--queues", "light", "--beat")
    celery = Celery(broker=broker)
    stack = {
        "send": lambda name, args: celery.send_task(
            name, args=args, queue=name.endswith("run_job") and "training" or "light"
        ),
        "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0),
        "start": start,
        "training": start("training", "worker", "--queues", "training"),
    }
    try:
        yield stack
    finally:
        for proc in procs:
            proc.stop()
        redis.Redis.from_url(broker).flushdb()
        services.drop_database(pg_server, database)


def test_sdk_drives_a_job_to_success_on_postgres_redis_and_celery(
    production_stack: dict[str, Any], tmp_path: Path
) -> None:
    client: openai.OpenAI = production_stack["client"]
    train, valid = upload_pair(client, tmp_path)
    assert [f.id for f in client.files.list()] == [valid, train]
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=train, validation_file=valid, method=METHOD, seed=3, suffix="e2e"
    )
    assert job.status == "validating_files"
    done = poll(client, job.id, TERMINAL)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:smollm2-135m-instruct:")
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed."
    assert [e.data["step"] for e in events if e.type == "metrics"] == list(range(8, 0, -1))  # type: ignore[index]
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-8"

    # A duplicated broker message is harmless: the job row says it is done, so nobody runs it again.
    production_stack["send"]("workers.tasks.run_job", [job.id])
    production_stack["send"]("workers.tasks.validate_job", [job.id])
    time.sleep(2)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert len(list(client.fine_tuning.jobs.list_events(job.id, limit=100))) == len(events)


def test_a_succeeded_job_reaches_a_failing_webhook_by_retries_and_leaves_a_results_csv(
    production_stack: dict[str, Any], tmp_path: Path
) -> None:
    client: openai.OpenAI = production_stack["client"]
    with Receiver(fail_first=2) as finished, Receiver() as checkpoints:
        hook = client.webhooks.create(name="ci", url=finished.url, event_types=["fine_tuning.job.succeeded"])
        finished.secret = hook.signing_secret
        types: Any = ["fine_tuning.job.checkpoint.created"]
        checkpoints.secret = client.webhooks.create(name="ckpt", url=checkpoints.url, event_types=types).signing_secret
        train, valid = upload_pair(client, tmp_path)
        job = client.fine_tuning.jobs.create(
            model="tiny-random-llama", training_file=train, validation_file=valid, method=METHOD
        )
        done = poll(client, job.id, TERMINAL)
        assert done.status == "succeeded", done.error
        arrived = finished.wait_for(3)  # two 500s, then the receiver takes it
        event = client.webhooks.unwrap(arrived[-1].body, arrived[-1].headers, secret=hook.signing_secret)
        saved = [d.event["data"]["step_number"] for d in checkpoints.wait_for(4)]
    assert [d.status for d in arrived] == [500, 500, 204] and all(d.verified for d in arrived)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == job.id
    assert sorted(saved) == [2, 4, 6, 8]
    log: Any = client.get(f"/webhook_endpoints/{hook.id}/deliveries", cast_to=object)
    assert [(a["attempt"], a["status_code"]) for a in reversed(log["data"])] == [(1, 500), (2, 500), (3, 204)]
    (results,) = done.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    lines = client.files.content(results).read().decode().splitlines()
    assert lines[0].startswith("step,total_steps,train_reward_mean") and len(lines) == 1 + 8


def test_sdk_cancel_pause_and_resume_on_the_production_stack(production_stack: dict[str, Any], tmp_path: Path) -> None:
    client: openai.OpenAI = production_stack["client"]
    train, valid = upload_pair(client, tmp_path)
    job = client.fine_tuning.jobs.create(
        model="tiny-random-llama", training_file=train, validation_file=valid, method=METHOD
    )
    poll(client, job.id, {"running"})
    client.fine_tuning.jobs.pause(job.id)
    paused = poll(client, job.id, {"paused"} | TERMINAL)
    assert paused.status == "paused"
    paused_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id))
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert poll(client, job.id, TERMINAL).status == "succeeded"
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == list(range(1, 9)) and paused_at >= 1

    other = client.fine_tuning.jobs.create(
        model="tiny-random-llama", training_file=train, validation_file=valid, method=METHOD
    )
    poll(client, other.id, {"running"})
    client.fine_tuning.jobs.cancel(other.id)
    cancelled = poll(client, other.id, TERMINAL)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(other.id)


def test_job_survives_sigkill_of_its_worker_and_resumes_from_checkpoint(
    production_stack: dict[str, Any], tmp_path: Path
) -> None:
    client: openai.OpenAI = production_stack["client"]
    train, valid = upload_pair(client, tmp_path)
    job = client.fine_tuning.jobs.create(
        model="tiny-random-llama", training_file=train, validation_file=valid, method=METHOD
    )
    deadline = time.time() + 60
    while not list(client.fine_tuning.jobs.checkpoints.list(job.id)) and time.time() < deadline:
        time.sleep(0.1)
    production_stack["training"].kill(signal.SIGKILL)
    production_stack["start"]("training2", "worker", "--queues", "training")
    done = poll(client, job.id, TERMINAL, timeout=120)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    assert any("Worker stopped responding" in e.message and e.level == "warn" for e in events)
    assert any(e.message.startswith("Resuming from checkpoint") for e in events)
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == list(range(1, 9)), "every step recorded exactly once"


def test_embedded_rft_serve_runs_the_flow_with_no_external_service(tmp_path: Path) -> None:
    port = free_port()
    env = {"RFT_DATA_DIR": str(tmp_path / "data"), "RFT_DATABASE_URL": "", "RFT_BROKER_URL": ""}
    env["RFT_WEBHOOK_ALLOWED_NETWORKS"] = '["127.0.0.1/32"]'
    serve = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    receiver = Receiver().__enter__()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serve)
        key = printed_api_key(serve)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        types: Any = ["fine_tuning.job.succeeded", "fine_tuning.job.failed"]
        receiver.secret = client.webhooks.create(name="ci", url=receiver.url, event_types=types).signing_secret
        train, valid = upload_pair(client, tmp_path)
        job = client.fine_tuning.jobs.create(
            model="tiny-random-llama", training_file=train, validation_file=valid, method=METHOD, seed=5
        )
        done = poll(client, job.id, TERMINAL, timeout=240)
        # The embedded worker runs the real RL loop: rollouts, grading, updates, evals, checkpoints.
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:tiny-random-llama:")
        assert done.hyperparameters.batch_size == 4  # "auto" resolved and echoed
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert any(e.message.startswith("Final model: the checkpoint at step") for e in events)
        metrics: list[Any] = [e.data for e in events if e.type == "metrics"]
        assert metrics and {"train_reward_mean", "kl", "loss", "timing"} <= set(metrics[0])
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
        assert checkpoints and done.fine_tuned_model in {c.fine_tuned_model_checkpoint for c in checkpoints}
        # Through the filesystem broker too: the light worker delivers the signed event, and the results
        # file holds the real loop's metrics.
        (announced,) = receiver.wait_for(1, type="fine_tuning.job.succeeded")
        assert announced.verified and announced.event["data"] == {"id": job.id}
        (results,) = done.result_files
        header = client.files.content(results).read().decode().splitlines()[0].split(",")
        assert header[:3] == ["step", "total_steps", "train_reward_mean"] and {"kl", "loss"} <= set(header)
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n[1, 2]\n")
        with open(bad, "rb") as f:
            bad_id = client.files.create(file=f, purpose="fine-tune").id
        failed = poll(
            client,
            client.fine_tuning.jobs.create(model="tiny-random-llama", training_file=bad_id, method=METHOD).id,
            TERMINAL,
        )
        assert failed.error is not None and failed.error.param == "training_file"
        assert "line 2: must be a JSON object" in failed.error.message
        assert failed.result_files == []  # it never trained
        assert receiver.wait_for(1, type="fine_tuning.job.failed")[0].event["data"] == {"id": failed.id}
        queued = client.fine_tuning.jobs.create(
            model="tiny-random-llama", training_file=train, method=METHOD, metadata={"k": "v"}
        )
        assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"k": "v"})] == [queued.id]
        assert len(list(client.fine_tuning.jobs.list(limit=1))) == 3  # auto-pagination follows `after`
        assert client.files.content(train).read() == jsonl(GOOD_LINES[:4])
        assert client.files.delete(valid).deleted
        assert [f.id for f in client.files.list(purpose="fine-tune", limit=1)] == [bad_id, train]
        assert (tmp_path / "data" / "rft.db").exists()
        assert len(pids_with_env("RFT_DATA_DIR", env["RFT_DATA_DIR"])) >= 3  # the API and its two workers
    finally:
        receiver.__exit__()
        # rft serve waits for its workers' warm shutdown (up to RFT_SHUTDOWN_GRACE_SECONDS); on a
        # loaded machine that once took over 30 s, and SIGKILLing serve then orphaned them.
        serve.stop(timeout=150)
    deadline = time.time() + 15
    while pids_with_env("RFT_DATA_DIR", env["RFT_DATA_DIR"]) and time.time() < deadline:
        time.sleep(0.2)
    assert pids_with_env("RFT_DATA_DIR", env["RFT_DATA_DIR"]) == [], "rft serve left workers running"
