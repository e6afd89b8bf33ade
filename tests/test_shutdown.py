"""Graceful shutdown with real processes: SIGTERM to a training worker (what `docker stop` and
systemd send) checkpoints the running job after its step and requeues it, uncounted, for the next
worker; the resumed job ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.support import chaos
from tests.support.procs import Proc


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
