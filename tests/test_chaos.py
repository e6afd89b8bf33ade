"""Chaos with real processes: a real Celery training worker runs the real RL loop on a tiny model
while the test kills it inside a checkpoint write, restarts its broker, restarts its database, or
fills its disk. Each time, no step, event or checkpoint is lost or recorded twice, no half checkpoint
is ever recorded, and the resumed job ends with exactly the weights of an uninterrupted run.

The servers restarted here are throwaway ones on free ports, never the shared 5432 and 6379."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth.service import create_api_key
from service.core import db
from service.core.migrate import upgrade
from service.core.settings import Settings
from service.core.storage import job_folder
from tests.support import chaos
from tests.support.procs import Proc
from workers import lease


@pytest.fixture
def broker() -> Iterator[chaos.RedisServer]:
    server = chaos.RedisServer()
    yield server
    server.stop()


def finish_on_a_fresh_worker(
    settings: Settings, job_id: str, broker: str, procs: list[Proc], tmp_path: Path, wake: bool = True
) -> None:
    procs.append(chaos.start_worker(tmp_path, f"worker{len(procs)}", chaos.worker_env(settings, broker)))
    if wake:
        chaos.wake(broker, job_id)
    chaos.wait_for(
        "the job to end", lambda: chaos.job(settings, job_id).status in {"succeeded", "failed", "paused"}, 150
    )
    assert chaos.job(settings, job_id).status == "succeeded", chaos.job(settings, job_id).error


def assert_nothing_lost_or_doubled(settings: Settings, job_id: str) -> None:
    assert chaos.metric_steps(settings, job_id) == list(range(1, chaos.TOTAL_STEPS + 1))
    assert chaos.duplicated_events(settings, job_id) == []
    steps = [c.step_number for c in chaos.checkpoints(settings, job_id)]
    assert steps == sorted(set(steps)) and steps[-1] == chaos.TOTAL_STEPS
    for ckpt in chaos.checkpoints(settings, job_id):
        chaos.assert_complete(settings, ckpt)


def wait_for_child_killed(proc: Proc) -> None:
    chaos.wait_for("the pool child to be SIGKILLed", lambda: "signal 9 (SIGKILL)" in proc.output(), timeout=120)
    proc.kill()


@pytest.mark.parametrize("where", ["write", "commit"])
def test_sigkill_inside_a_checkpoint_write_never_records_half_a_checkpoint(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    broker: chaos.RedisServer,
    procs: list[Proc],
    tmp_path: Path,
    sent_tasks: list[Any],
    where: str,
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    job_id = chaos.queued_job(live_client, live_auth, live_settings)
    env = chaos.worker_env(live_settings, broker.url, RFT_TEST_KILL_IN_CHECKPOINT=f"4:{where}")
    procs.append(chaos.start_worker(tmp_path, "killed", env))
    chaos.wake(broker.url, job_id)
    wait_for_child_killed(procs[0])
    assert [c.step_number for c in chaos.checkpoints(live_settings, job_id)] == [2], "step 4 was never recorded"
    folder = live_settings.storage_dir / chaos.checkpoints(live_settings, job_id)[0].storage_key
    assert (folder.parent / "step-000004").exists() == (where == "commit")  # there, but unreferenced
    for ckpt in chaos.checkpoints(live_settings, job_id):
        chaos.assert_complete(live_settings, ckpt)
        response = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt.id}/content", headers=live_auth)
        assert response.status_code == 200 and len(response.content) > 0
    # The lease lapses; the reaper requeues the job (attempt 2) from its step-2 checkpoint.
    chaos.wait_for("the reaper to requeue the job", lambda: _reap(live_settings)["requeued"], timeout=30, every=0.5)
    finish_on_a_fresh_worker(live_settings, job_id, broker.url, procs, tmp_path)
    assert_nothing_lost_or_doubled(live_settings, job_id)
    assert chaos.job(live_settings, job_id).attempts == 2
    chaos.assert_same_weights(chaos.final_weights(live_settings, job_id), reference)


def _reap(settings: Settings) -> dict[str, int]:
    with db.unit_of_work(settings) as session:
        return lease.reap(session, settings)


def test_broker_restart_mid_job_loses_nothing(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    broker: chaos.RedisServer,
    procs: list[Proc],
    tmp_path: Path,
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    job_id = chaos.queued_job(live_client, live_auth, live_settings)
    procs.append(
        chaos.start_worker(tmp_path, "worker", chaos.worker_env(live_settings, broker.url, RFT_TEST_STEP_SLEEP="0.7"))
    )
    chaos.wake(broker.url, job_id)
    chaos.wait_for("step 1", lambda: chaos.metric_steps(live_settings, job_id), timeout=120)
    broker.stop()
    time.sleep(1.5)
    broker.start()
    assert chaos.metric_steps(live_settings, job_id)[-1] < chaos.TOTAL_STEPS, "the restart came too late"
    chaos.wait_for("the job to succeed", lambda: chaos.job(live_settings, job_id).status == "succeeded", 120)
    assert_nothing_lost_or_doubled(live_settings, job_id)
    assert chaos.job(live_settings, job_id).attempts == 1
    chaos.assert_same_weights(chaos.final_weights(live_settings, job_id), reference)
    # The worker reconnected: it takes new work from the restarted broker.
    again = chaos.queued_job(live_client, live_auth, live_settings)
    chaos.wake(broker.url, again)
    chaos.wait_for("a job after the restart", lambda: chaos.job(live_settings, again).status == "succeeded", 120)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[chaos.PostgresServer, Settings]]:
    server = chaos.PostgresServer()
    upgrade(server.url)
    settings = Settings(
        env="dev", data_dir=tmp_path / "pgdata", database_url=server.url, lease_seconds=3, heartbeat_seconds=0.5
    )
    yield server, settings
    server.stop()


def test_database_restart_mid_job_the_worker_retries_and_the_job_continues(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    own_postgres: tuple[chaos.PostgresServer, Settings],
    broker: chaos.RedisServer,
    procs: list[Proc],
    tmp_path: Path,
    sent_tasks: list[Any],
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    server, settings = own_postgres
    with db.unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, "chaos")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        job_id = chaos.queued_job(client, auth, settings)
    env = chaos.worker_env(settings, broker.url, RFT_TEST_STEP_SLEEP="0.7")
    procs.append(chaos.start_worker(tmp_path, "worker", env))
    chaos.wake(broker.url, job_id)
    chaos.wait_for("step 1", lambda: chaos.metric_steps(settings, job_id), timeout=120)
    server.ctl("-m", "fast", "stop")  # every connection drops; new ones are refused
    time.sleep(2)
    server.ctl("start")
    assert chaos.metric_steps(settings, job_id)[-1] < chaos.TOTAL_STEPS, "the restart came too late"
    chaos.wait_for("the job to end", lambda: chaos.job(settings, job_id).status in {"succeeded", "failed"}, 150)
    assert chaos.job(settings, job_id).status == "succeeded", chaos.job(settings, job_id).error
    assert "database unreachable" in procs[0].output(), "the restart was not felt by the worker"
    assert_nothing_lost_or_doubled(settings, job_id)
    chaos.assert_same_weights(chaos.final_weights(settings, job_id), reference)


def test_api_answers_after_a_database_restart_without_a_5xx(
    own_postgres: tuple[chaos.PostgresServer, Settings], sent_tasks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool pings only connections idle for a second (no round trip per request under load), and
    the status poll reads again on a connection the database dropped: a restart costs no 500."""
    server, settings = own_postgres
    with db.unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, "restart")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        job_id = chaos.queued_job(client, auth, settings)
        assert client.get("/v1/fine_tuning/jobs", headers=auth).status_code == 200
        server.ctl("-m", "fast", "restart")  # every pooled connection is now dead
        time.sleep(db.PING_AFTER_IDLE_SECONDS + 0.2)
        listed = client.get("/v1/fine_tuning/jobs", headers=auth)  # idle past the window: pinged, replaced
        assert listed.status_code == 200, listed.text
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600.0)  # a restart inside the window: no ping
        server.ctl("-m", "fast", "restart")
        polled = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth)
        assert polled.status_code == 200, polled.text
        assert polled.json()["status"] == "queued"


def mount_small_volume(folder: Path, size: int) -> None:
    """A tmpfs of `size` bytes over `folder` (the test runs as root); unmounted by the caller."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")


def test_full_disk_during_a_checkpoint_pauses_the_job_saying_so_and_keeps_earlier_checkpoints(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    broker: chaos.RedisServer,
    procs: list[Proc],
    tmp_path: Path,
) -> None:
    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    job_id = chaos.queued_job(live_client, live_auth, live_settings)
    # The job's own checkpoint folder gets room for one and a half checkpoints: step 2 fits, step 4 not.
    volume = live_settings.storage_dir / job_folder(chaos.job(live_settings, job_id).project_id, job_id)
    mount_small_volume(volume, int(chaos.reference_checkpoint_bytes() * 1.5))
    try:
        procs.append(chaos.start_worker(tmp_path, "worker", chaos.worker_env(live_settings, broker.url)))
        chaos.wake(broker.url, job_id)
        stopped = chaos.wait_for(
            "the job to stop", lambda: chaos.job(live_settings, job_id).status in {"paused", "failed"}, 150
        )
        assert stopped and chaos.job(live_settings, job_id).status == "paused"
        last = chaos.events(live_settings, job_id)[-1]
        assert last.level == "error" and "the storage volume is full (No space left on device" in last.message
        assert "checkpoint of step 4" in last.message and "resume the job" in last.message
        assert [c.step_number for c in chaos.checkpoints(live_settings, job_id)] == [2]
        chaos.assert_complete(live_settings, chaos.checkpoints(live_settings, job_id)[0])
        assert not list(volume.glob(".*.partial")), "the failed write's staging folder was left behind"
        # Free space (here: grow the volume), resume, and the job ends exactly as if nothing happened.
        subprocess.run(
            ["mount", "-o", f"remount,size={chaos.reference_checkpoint_bytes() * 10}", str(volume)], check=True
        )
        ckpt = chaos.checkpoints(live_settings, job_id)[0]
        download = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt.id}/content", headers=live_auth)
        assert download.status_code == 200 and len(download.content) > 0
        assert live_client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=live_auth).status_code == 200
        chaos.wake(broker.url, job_id)  # the same worker, ready for its next job
        chaos.wait_for("the job to end", lambda: chaos.job(live_settings, job_id).status == "succeeded", 150)
        assert_nothing_lost_or_doubled(live_settings, job_id)
        chaos.assert_same_weights(chaos.final_weights(live_settings, job_id), reference)
    finally:
        for proc in procs:
            proc.stop()
        subprocess.run(["umount", "-l", str(volume)], check=False)
