"""One job on several devices (workers/rl/ranks.py): two gloo processes on this CPU train what one
process trains (data parallel for LoRA, FSDP2 for full fine-tuning), resume exactly, and a rank that
dies or falls silent requeues the job instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint, Job, JobMetric
from tests.conftest import submit, upload
from tests.support import chaos
from tests.support.procs import Proc
from workers import runner
from workers.context import JobContext, TrainingResult
from workers.rl import launch
from workers.training import run_training

# A dense reward a random byte-level model can climb: the share of lowercase ASCII letters it writes.
LOWERCASE = """
def grade(sample, item):
    text = sample["output_text"]
    return sum(c.isascii() and c.islower() for c in text) / max(1, len(text))
"""
PROMPTS = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"write {'x' * i} {i}"}]}).encode() + b"\n" for i in range(6)
)
# The same job trained in one process and in two agrees within float noise: the ranks sum their
# gradients in another order, and AdamW turns a near-zero gradient's noise into up to a step of lr.
# Measured here: the loss and gradient norm within 2e-6 relative, no weight apart by more than 0.2%
# of one step (lr) in 3 steps. A rank's share lost or counted twice, or a mean where the sum is due,
# moves the gradient norm, the loss and the weights by orders of magnitude more.
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 0.01  # of the learning rate


def create(client: TestClient, auth: dict[str, str], settings: Settings, **hyper: Any) -> str:
    file_id = upload(client, auth, PROMPTS).json()["id"]
    hp = {
        "batch_size": 6,
        "compute_multiplier": 1,
        "max_completion_tokens": 8,
        "eval_samples": 2,
        "eval_interval": 1,
        "beta": 0.05,
        "mask_truncated_completions": False,
        "learning_rate_multiplier": 300,
        "n_epochs": 3,
        **hyper,
    }
    body = {
        "model": "tiny-random-llama",
        "training_file": file_id,
        "seed": 5,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": {"type": "python", "name": "lower", "source": LOWERCASE},
                "hyperparameters": hp,
            },
        },
    }
    job_id = submit(client, auth, settings, body)
    return job_id


def run(client: TestClient, auth: dict[str, str], settings: Settings, **hyper: Any) -> str:
    job_id = create(client, auth, settings, **hyper)
    runner.run_job(job_id, settings)
    return job_id


def job(settings: Settings, job_id: str) -> Job:
    with unit_of_work(settings) as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def metrics(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    with unit_of_work(settings) as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
        return [r.data for r in rows]


def last_weights(settings: Settings, job_id: str, step: int | None = None) -> dict[str, torch.Tensor]:
    """The trained weights of the newest checkpoint (or step `step`'s): the model, or its adapters."""
    with unit_of_work(settings) as session:
        query = select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id)
        if step is not None:
            query = query.where(Checkpoint.step_number == step)
        key = session.scalars(query.order_by(Checkpoint.step_number.desc())).first()
    assert key is not None
    folder = settings.storage_dir / key
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def assert_same_training(settings: Settings, one: str, two: str, learning_rate: float) -> None:
    assert job(settings, one).status == "succeeded", job(settings, one).error
    assert job(settings, two).status == "succeeded", job(settings, two).error
    a, b = metrics(settings, one), metrics(settings, two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["train_reward_mean"] == pytest.approx(y["train_reward_mean"], abs=1e-9)  # the same samples
        assert x["valid_reward_mean"] == pytest.approx(y["valid_reward_mean"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=LOSS_TOLERANCE)
        assert x["kl"] == pytest.approx(y["kl"], rel=LOSS_TOLERANCE, abs=1e-7)
    wa, wb = last_weights(settings, one), last_weights(settings, two)
    assert wa.keys() == wb.keys()
    first = last_weights(settings, one, step=1)
    moved = max(float((wa[k] - first[k]).abs().max()) for k in wa)
    assert moved > learning_rate  # the weights did move, by more than an AdamW step
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < WEIGHT_TOLERANCE * learning_rate, worst


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full-fsdp2", "lora-data-parallel"])
def test_two_processes_train_what_one_process_trains(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, lora_rank: int
) -> None:
    two_devices = live_settings.model_copy(update={"worker_devices": 2})
    one = run(live_client, live_auth, live_settings, lora_rank=lora_rank, n_devices=1)
    two = run(live_client, live_auth, two_devices, lora_rank=lora_rank, n_devices=2)
    learning_rate = (1e-4 if lora_rank else 1e-5) * 300
    assert_same_training(live_settings, one, two, learning_rate)
    assert job(live_settings, two).method["reinforcement"]["hyperparameters"]["n_devices"] == 2
    how = "FSDP2" if lora_rank == 0 else "data parallel"
    assert any(how in m and "2 devices" in m for m in messages(live_settings, two)), messages(live_settings, two)


def messages(settings: Settings, job_id: str, level: str | None = None) -> list[str]:
    from service.core.tables import JobEvent

    with unit_of_work(settings) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.created_at)).all()
        return [e.message for e in rows if level is None or e.level == level]


def followers_of(pid: int) -> list[int]:
    """The follower ranks `pid` started (`python -m workers.rl.follower`)."""
    return [f for f in all_followers() if parent_of(f) == pid]


FAULT: dict[str, int] = {"signal": signal.SIGKILL}


def fault_after_first_step(ctx: JobContext) -> TrainingResult:
    """The real trainer (RFT_TRAINER), whose rank 1 gets `FAULT["signal"]` once step 1 is recorded."""
    record = ctx.metrics

    def metrics(step: int, data: dict[str, Any]) -> None:
        record(step, data)
        if step == 1 and ctx.job["attempts"] == 1:
            for pid in followers_of(os.getpid()):
                os.kill(pid, FAULT["signal"])

    ctx.metrics = metrics  # type: ignore[method-assign]
    return run_training(ctx)


@pytest.mark.parametrize(
    ("fault", "seen", "lora_rank"),
    [
        (signal.SIGKILL, "rank 1 was killed by SIGKILL", 0),
        (signal.SIGSTOP, "rank 1 is running but did not answer", 4),
    ],
    ids=["dead-rank-fsdp2", "silent-rank-data-parallel"],
)
def test_a_lost_rank_requeues_the_job_which_resumes_exactly(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, fault: int, seen: str, lora_rank: int
) -> None:
    two = live_settings.model_copy(update={"worker_devices": 2, "distributed_timeout_seconds": 5.0})
    uninterrupted = run(live_client, live_auth, two, n_devices=2, lora_rank=lora_rank)
    faulty = two.model_copy(update={"trainer": "tests.test_distributed:fault_after_first_step"})
    FAULT["signal"] = fault
    job_id = create(live_client, live_auth, two, n_devices=2, lora_rank=lora_rank)
    runner.run_job(job_id, faulty)
    row = job(two, job_id)
    assert row.status == "queued", (row.status, row.error)
    warning = [m for m in messages(two, job_id, "warn") if "Job requeued (attempt 2 of 3)" in m]
    assert warning and seen in warning[0], messages(two, job_id)
    assert not followers_of(os.getpid()), "rank 0 left a follower behind"
    runner.run_job(job_id, two)  # the next attempt, on a healthy pair of ranks
    assert job(two, job_id).status == "succeeded", job(two, job_id).error
    assert any(m.startswith("Resumed from the checkpoint at step 1") for m in messages(two, job_id))
    a, b = last_weights(two, uninterrupted), last_weights(two, job_id)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run did not end with the uninterrupted weights"


SEEN_LISTENING: list[str] = []


def listening_addresses(pids: list[int]) -> list[str]:
    """The addresses the TCP sockets of `pids` listen on ("127.0.0.1:port", "0.0.0.0:port", ...)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                words = [raw[i : i + 4][::-1] for i in range(0, size, 4)]  # each 32-bit word little-endian
                ip = socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, b"".join(words))
                found.append(f"{ip}:{int(port, 16)}")
    return found


def record_listening_sockets(ctx: JobContext) -> TrainingResult:
    """The real trainer (RFT_TRAINER), noting where the job's ranks listen once step 1 is recorded."""
    record = ctx.metrics

    def metrics(step: int, data: dict[str, Any]) -> None:
        record(step, data)
        if step == 1:
            SEEN_LISTENING[:] = listening_addresses([os.getpid(), *followers_of(os.getpid())])

    ctx.metrics = metrics  # type: ignore[method-assign]
    return run_training(ctx)


def test_the_ranks_listen_on_loopback_alone(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    """The ranks exchange pickled objects: a peer on the network that joined their store or reached
    their sockets could run code in the worker. Nothing of the group may listen beyond loopback."""
    watched = live_settings.model_copy(
        update={"worker_devices": 2, "trainer": "tests.test_distributed:record_listening_sockets"}
    )
    job_id = run(live_client, live_auth, watched, n_devices=2, n_epochs=1)
    assert job(watched, job_id).status == "succeeded", job(watched, job_id).error
    assert len(SEEN_LISTENING) >= 2, SEEN_LISTENING  # the store and each rank's own sockets
    exposed = [a for a in SEEN_LISTENING if not a.startswith(("127.", "::1:", "::ffff:127."))]
    assert not exposed, f"the job's process group listens beyond loopback: {exposed}"


def test_the_last_attempt_lost_to_a_rank_fails_the_job_with_the_reason(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    faulty = live_settings.model_copy(
        update={"worker_devices": 2, "max_attempts": 1, "trainer": "tests.test_distributed:fault_after_first_step"}
    )
    FAULT["signal"] = signal.SIGKILL
    job_id = create(live_client, live_auth, faulty, n_devices=2)
    runner.run_job(job_id, faulty)
    row = job(faulty, job_id)
    assert row.status == "failed" and row.error is not None
    assert row.error["code"] == "rank_lost" and "rank 1 was killed by SIGKILL" in row.error["message"], row.error


def test_a_rank_that_cannot_start_requeues_the_job_with_its_output(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    two = live_settings.model_copy(update={"worker_devices": 2})
    monkeypatch.setattr(launch.sys, "executable", "/bin/false")  # rank 1's interpreter is broken
    job_id = create(live_client, live_auth, two, n_devices=2)
    runner.run_job(job_id, two)
    assert job(two, job_id).status == "queued"
    assert any("did not start: rank 1 exited with code 1" in m for m in messages(two, job_id, "warn"))


def parent_of(pid: int) -> int:
    """`pid`'s parent, or -1 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_a_worker_killed_mid_job_leaves_no_rank_behind(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    procs: list[Proc],
    tmp_path: Path,
    sent_tasks: list[Any],
) -> None:
    broker = chaos.RedisServer()
    try:
        env = chaos.worker_env(live_settings, broker.url, RFT_TEST_STEP_SLEEP="1", RFT_WORKER_DEVICES="2")
        worker = chaos.start_worker(tmp_path, "worker", env)
        procs.append(worker)
        job_id = create(live_client, live_auth, live_settings, n_devices=2)
        chaos.wake(broker.url, job_id)
        chaos.wait_for("step 1", lambda: metrics(live_settings, job_id), timeout=180)
        # rank 0 is the worker's pool process running the job; rank 1 its child
        (follower,) = [f for f in all_followers() if parent_of(parent_of(f)) == worker.popen.pid]
        leader = parent_of(follower)
        # Rank 1 busy outside any collective (stopped, here) would never notice rank 0's end by itself.
        os.kill(follower, signal.SIGSTOP)
        os.kill(leader, signal.SIGKILL)  # as the kernel's OOM killer would
        chaos.wait_for("rank 1 to die with rank 0", lambda: follower not in all_followers(), timeout=15)
    finally:
        broker.stop()


def all_followers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"workers.rl.follower" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
