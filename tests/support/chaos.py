"""What the shutdown and chaos tests share: throwaway Redis and PostgreSQL servers they may restart
(never the shared ones), a real Celery training worker, an RL job, and its per-step records."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import torch
from celery import Celery
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import func, select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint, Job, JobEvent, JobMetric
from tests.conftest import submit, upload
from tests.support.procs import Proc, free_port
from tests.support.services import _as_postgres
from workers import runner

PROMPTS = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"write {i}"}], "answer": "abcdefgh"}).encode() + b"\n"
    for i in range(4)
)
# A dense reward (no sandbox needed): how close the completion is to a fixed lowercase string.
GRADER = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}
HYPER = {
    "batch_size": 4,
    "compute_multiplier": 2,
    "max_completion_tokens": 8,
    "eval_samples": 2,
    "eval_interval": 2,
    "beta": 0.0,
    "learning_rate_multiplier": 3000,
    "n_epochs": 6,
}
TOTAL_STEPS = 6


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90, every: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on a free port, without persistence: a restart loses its queue."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_for("redis", self._ping, timeout=10)

    def _ping(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PostgresServer:
    """A throwaway PostgreSQL cluster in a temporary folder, run as the `postgres` OS user."""

    def __init__(self) -> None:
        initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)[0]
        self.pg_ctl = str(Path(initdb).with_name("pg_ctl"))
        self.data = tempfile.mkdtemp(prefix="rft-chaos-pg-")
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            _as_postgres([initdb, "-D", self.data, "-A", "trust", "-U", "postgres"]), check=True, capture_output=True
        )
        self.ctl("start")

    def ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        argv = [self.pg_ctl, "-D", self.data, "-o", opts, "-w", "-l", f"{self.data}/log", *args]
        subprocess.run(_as_postgres(argv), check=True, capture_output=True)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.ctl("-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


def worker_env(settings: Settings, broker: str, **extra: str) -> dict[str, str]:
    return {
        "RFT_DATA_DIR": str(settings.data_dir),
        "RFT_DATABASE_URL": settings.database_url,
        "RFT_BROKER_URL": broker,
        "RFT_TRAINER": "tests.support.faults:rl",
        "RFT_LEASE_SECONDS": "3",
        "RFT_HEARTBEAT_SECONDS": "0.5",
        "RFT_STALE_QUEUED_SECONDS": "3600",
        **extra,
    }


def start_worker(tmp: Path, name: str, env: dict[str, str]) -> Proc:
    return Proc(["worker", "--queues", "training"], env, tmp / f"{name}.log")


def job_body(file_id: str) -> dict[str, Any]:
    return {
        "model": "tiny-random-llama",
        "training_file": file_id,
        "seed": 11,
        "method": {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": HYPER}},
    }


def queued_job(client: TestClient, auth: dict[str, str], settings: Settings) -> str:
    file_id = upload(client, auth, PROMPTS).json()["id"]
    job_id = submit(client, auth, settings, job_body(file_id))
    assert job(settings, job_id).status == "queued"
    return job_id


def wake(broker: str, job_id: str) -> None:
    Celery(broker=broker).send_task("workers.tasks.run_job", args=[job_id], queue="training")


_reference: dict[str, Any] = {}


def uninterrupted_weights(client: TestClient, auth: dict[str, str], settings: Settings) -> dict[str, torch.Tensor]:
    """The final weights of the same job run straight through in this process (computed once)."""
    if "weights" not in _reference:
        job_id = queued_job(client, auth, settings)
        runner.run_job(job_id, settings.model_copy(update={"trainer": "workers.training:run_training"}))
        assert job(settings, job_id).status == "succeeded", job(settings, job_id).error
        _reference["weights"] = final_weights(settings, job_id)
        folder = settings.storage_dir / checkpoints(settings, job_id)[-1].storage_key
        _reference["bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    weights: dict[str, torch.Tensor] = _reference["weights"]
    return weights


def reference_checkpoint_bytes() -> int:
    """The size of one of the uninterrupted run's checkpoints (run `uninterrupted_weights` first)."""
    return int(_reference["bytes"])


def job(settings: Settings, job_id: str) -> Job:
    with unit_of_work(settings) as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def metric_steps(settings: Settings, job_id: str) -> list[int]:
    with unit_of_work(settings) as session:
        stmt = select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        return list(session.scalars(stmt).all())


def checkpoints(settings: Settings, job_id: str) -> list[Checkpoint]:
    with unit_of_work(settings) as session:
        stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)
        return list(session.scalars(stmt).all())


def events(settings: Settings, job_id: str) -> list[JobEvent]:
    with unit_of_work(settings) as session:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        return list(session.scalars(stmt).all())


def duplicated_events(settings: Settings, job_id: str) -> list[tuple[str, int]]:
    with unit_of_work(settings) as session:
        stmt = (
            select(JobEvent.dedupe_key, func.count())
            .where(JobEvent.job_id == job_id, JobEvent.dedupe_key.is_not(None))
            .group_by(JobEvent.dedupe_key)
            .having(func.count() > 1)
        )
        return [(str(k), int(n)) for k, n in session.execute(stmt).all()]


def assert_complete(settings: Settings, ckpt: Checkpoint) -> None:
    """A recorded checkpoint is whole: its weights and trainer state load."""
    folder = settings.storage_dir / ckpt.storage_key
    load_file(str(folder / "model.safetensors"))
    torch.load(folder / "trainer_state.pt", weights_only=False)


def final_weights(settings: Settings, job_id: str) -> dict[str, torch.Tensor]:
    last = checkpoints(settings, job_id)[-1]
    return load_file(str(settings.storage_dir / last.storage_key / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


def sigterm(proc: Proc) -> float:
    """SIGTERM the main process only (what `docker stop` does); seconds until the group is gone."""
    t0 = time.time()
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=120)
    return time.time() - t0
