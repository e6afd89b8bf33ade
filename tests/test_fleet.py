"""A fleet with no shared folder: the API and each training worker are separate processes, each with a
data folder the others cannot see (bubblewrap lays an empty tmpfs over the others' folders), sharing
only PostgreSQL, Redis and an S3 server over TCP. A job submitted through the official `openai` SDK
trains on a worker; its host is killed mid-job; a second worker on another "host" resumes it from
the object store and the API serves the checkpoint. The resumed job ends with exactly the weights of
an uninterrupted run."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load

from service.core import db
from service.core.settings import Settings
from tests.conftest import make_key, s3_bucket
from tests.support import chaos, services
from tests.support.procs import Proc, free_port, wait_healthy

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (apt install bubblewrap) is absent")


def hidden(*folders: Path) -> list[str]:
    """A bwrap prefix that runs a process with `folders` replaced by empty private tmpfs mounts."""
    argv = ["bwrap", "--dev-bind", "/", "/"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        argv += ["--tmpfs", str(folder)]
    return [*argv, "--die-with-parent", "--"]


def fleet_env(settings: Settings, s3: str, bucket: str, data_dir: Path, broker: str) -> dict[str, str]:
    keys = services.S3_KEY
    return {
        **chaos.worker_env(settings, broker),
        "RFT_DATA_DIR": str(data_dir),
        "RFT_STORAGE_URL": f"s3://{bucket}/fleet",
        "RFT_S3_ENDPOINT_URL": s3,
        "RFT_S3_ACCESS_KEY_ID": keys["s3_access_key_id"],
        "RFT_S3_SECRET_ACCESS_KEY": keys["s3_secret_access_key"],
        "RFT_S3_REGION": keys["s3_region"],
        "RFT_REAPER_INTERVAL_SECONDS": "1",
        "RFT_ADMIN_KEY": ADMIN,
    }


ADMIN = "fleet-operator-key-0123456789abcdef"


def fleet(port: int) -> dict[str, dict[str, Any]]:
    """GET /v1/workers with the operator's key: the training workers by host data folder."""
    listed = httpx.get(f"http://127.0.0.1:{port}/v1/workers", headers=bearer(ADMIN))
    assert listed.status_code == 200, listed.text
    return {w["id"]: w for w in listed.json()["data"] if "training" in w["queues"]}


def test_a_job_survives_its_worker_host_and_resumes_on_another_from_the_object_store(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    s3_server: str,
    procs: list[Proc],
    tmp_path: Path,
    sent_tasks: list[Any],
) -> None:
    import openai

    reference = chaos.uninterrupted_weights(live_client, live_auth, live_settings)
    broker = chaos.RedisServer()
    bucket = s3_bucket(s3_server)
    homes = {name: tmp_path / name for name in ("api", "host-a", "host-b")}
    env = {name: fleet_env(live_settings, s3_server, bucket, home, broker.url) for name, home in homes.items()}
    try:
        port = free_port()
        others = [h for n, h in homes.items() if n != "api"]
        api = Proc(["serve", "--no-workers", "--port", str(port)], env["api"], tmp_path / "api.log", hidden(*others))
        procs.append(api)
        wait_healthy(f"http://127.0.0.1:{port}", api)
        with db.unit_of_work(live_settings) as session:
            key = make_key(session, live_settings, "fleet")["Authorization"].removeprefix("Bearer ")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)

        host_a = {**env["host-a"], "RFT_TEST_STEP_SLEEP": "1"}
        argv = ["worker", "--queues", "training,light"]
        worker_a = Proc(argv, host_a, tmp_path / "a.log", hidden(homes["api"], homes["host-b"]))
        procs.append(worker_a)
        file_id = client.files.create(file=("train.jsonl", chaos.PROMPTS), purpose="fine-tune").id
        job_id = client.fine_tuning.jobs.create(**chaos.job_body(file_id)).id

        chaos.wait_for("a checkpoint from host A", lambda: chaos.checkpoints(live_settings, job_id), timeout=180)
        (a_id, a_row), *others_seen = fleet(port).items()
        assert not others_seen and a_row["healthy"] and a_row["current_job_id"] == job_id, a_row
        assert a_row["device_type"] == "cpu" and any(q.startswith("training.") for q in a_row["queues"])
        worker_a.kill()  # the host is gone: no checkpoint on the way out, its lease just lapses
        assert not list(homes["api"].rglob("*.safetensors")), "the API host holds no checkpoint bytes"
        assert list(homes["host-a"].rglob("*.safetensors")), "host A wrote its checkpoints through its own cache"
        shutil.rmtree(homes["host-a"])  # and its disk with it
        chaos.wait_for("host A to show as unhealthy", lambda: not fleet(port)[a_id]["healthy"], timeout=30)

        worker_b = Proc([*argv, "--beat"], env["host-b"], tmp_path / "b.log", hidden(homes["api"], homes["host-a"]))
        procs.append(worker_b)
        chaos.wait_for("the job to end", lambda: client.fine_tuning.jobs.retrieve(job_id).status in END, timeout=240)
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.status == "succeeded", (job.error, worker_b.output()[-3000:])
        assert chaos.job(live_settings, job_id).attempts == 2
        b_row = next(w for i, w in fleet(port).items() if i != a_id)
        assert b_row["healthy"] and b_row["current_job_id"] is None, b_row
        assert chaos.metric_steps(live_settings, job_id) == list(range(1, chaos.TOTAL_STEPS + 1))
        kept = [p for p in (homes["host-b"] / "cache").rglob("*") if p.is_file()]
        assert not kept, f"host B kept copies of the tenant's data after the job: {kept[:3]}"
        resumed = [e.message for e in chaos.events(live_settings, job_id) if e.message.startswith("Resumed from")]
        assert resumed, "host B started over instead of resuming from host A's checkpoint in the bucket"

        last = chaos.checkpoints(live_settings, job_id)[-1].id  # the reference is the last step's weights
        url = f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}/checkpoints/{last}/content"
        model = httpx.get(url, headers=bearer(key))
        assert model.status_code == 200, model.text
        with tarfile.open(fileobj=io.BytesIO(model.content)) as tar:
            member = tar.extractfile("model.safetensors")
            assert member is not None
            chaos.assert_same_weights(load(member.read()), reference)
    finally:
        broker.stop()


END = {"succeeded", "failed", "cancelled", "paused"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
