"""Graceful shutdown with real processes: SIGTERM to a training worker (what `docker stop` and
systemd send) checkpoints the running job after its step and requeues it, uncounted, for the next
worker; the resumed job ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.support import chaos
from tests.support.procs import Proc, free_port, pids_with_env, printed_api_key, wait_healthy


@pytest.fixture
def broker() -> Iterator[chaos.RedisServer]:
    server = chaos.RedisServer()
    yield server
    server.stop()


def test_sigterm_requeues_the_running_job_at_its_step_and_the_next_worker_finishes_it_exactly(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    broker: chaos.RedisServer,
    tmp_path: Path,
    sent_tasks: list[Any],
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    job_id = chaos.queued_job(live_client, live_auth, live_settings)
    env = chaos.worker_env(live_settings, broker.url, RFT_TEST_STEP_SLEEP="1.0")
    procs: list[Proc] = [chaos.start_worker(tmp_path, "first", env)]
    try:
        chaos.wake(broker.url, job_id)
        chaos.wait_for("step 1", lambda: chaos.metric_steps(live_settings, job_id), timeout=120)
        seconds = chaos.sigterm(procs[0])
        assert seconds < 20, f"the worker took {seconds:.1f}s to stop"
        stopped = chaos.job(live_settings, job_id)
        reached = chaos.metric_steps(live_settings, job_id)[-1]
        assert reached < chaos.TOTAL_STEPS, "the job finished before the SIGTERM landed; slow its steps"
        assert (stopped.status, stopped.attempts, stopped.worker_id) == ("queued", 0, None)
        assert [c.step_number for c in chaos.checkpoints(live_settings, job_id)][-1] == reached
        assert any(
            e.message.startswith(f"Worker stopping; job requeued at step {reached}")
            for e in chaos.events(live_settings, job_id)
        )
        procs.append(chaos.start_worker(tmp_path, "second", {**env, "RFT_TEST_STEP_SLEEP": "0"}))
        done = chaos.wait_for(
            "the second worker to finish the job from the wake-up the first one sent",
            lambda: chaos.job(live_settings, job_id).status in {"succeeded", "failed"},
            timeout=120,
        )
        assert done
        finished = chaos.job(live_settings, job_id)
        assert finished.status == "succeeded", finished.error
        assert finished.attempts == 1, "the interrupted attempt is not counted"
    finally:
        for proc in procs:
            proc.stop()
    assert chaos.metric_steps(live_settings, job_id) == list(range(1, chaos.TOTAL_STEPS + 1))
    assert chaos.duplicated_events(live_settings, job_id) == []
    for ckpt in chaos.checkpoints(live_settings, job_id):
        chaos.assert_complete(live_settings, ckpt)
    chaos.assert_same_weights(chaos.final_weights(live_settings, job_id), reference)


def test_sigterm_to_rft_serve_requeues_the_job_stops_every_worker_and_a_restart_finishes_it(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    data = tmp_path / "serve-data"
    settings = Settings(data_dir=data)  # what the server uses: SQLite and the filesystem broker
    port = free_port()
    env = {
        "RFT_DATA_DIR": str(data),
        "RFT_DATABASE_URL": "",
        "RFT_BROKER_URL": "",
        "RFT_TRAINER": "tests.support.faults:rl",
        "RFT_TEST_STEP_SLEEP": "1.0",
    }
    serve = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serve)
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {printed_api_key(serve)}"}
        )
        file_id = api.post("/files", files={"file": ("t.jsonl", chaos.PROMPTS)}, data={"purpose": "fine-tune"}).json()[
            "id"
        ]
        job_id = api.post("/fine_tuning/jobs", json=chaos.job_body(file_id)).json()["id"]
        chaos.wait_for("step 1", lambda: chaos.metric_steps(settings, job_id), timeout=120)
        seconds = chaos.sigterm(serve)
        gone = chaos.wait_for("every rft process to exit", lambda: not pids_with_env("RFT_DATA_DIR", str(data)), 30)
        assert gone and seconds < 30, f"rft serve took {seconds:.1f}s to stop"
    finally:
        serve.stop()
    stopped = chaos.job(settings, job_id)
    reached = chaos.metric_steps(settings, job_id)[-1]
    assert reached < chaos.TOTAL_STEPS, "the job finished before the SIGTERM landed; slow its steps"
    assert (stopped.status, stopped.attempts) == ("queued", 0)
    assert [c.step_number for c in chaos.checkpoints(settings, job_id)][-1] == reached
    again = Proc(["serve", "--port", str(port)], {**env, "RFT_TEST_STEP_SLEEP": "0"}, tmp_path / "again.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", again)
        chaos.wait_for(
            "the restarted server to finish the job", lambda: chaos.job(settings, job_id).status == "succeeded", 120
        )
    finally:
        again.stop()
    assert chaos.metric_steps(settings, job_id) == list(range(1, chaos.TOTAL_STEPS + 1))
    assert chaos.duplicated_events(settings, job_id) == []
    chaos.assert_same_weights(chaos.final_weights(settings, job_id), reference)
