"""Submitting and polling jobs must stay light: the API never imports torch (nor the trackers' wandb
and mlflow) for them, pre-flight included, and the Celery worker's parent process imports none of
it before it forks its job processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.auth.service import create_api_key
from service.core.db import unit_of_work
from service.core.queue import set_task_sender
from service.core.migrate import upgrade
from service.core.settings import Settings

settings = Settings(data_dir=sys.argv[1])
upgrade(settings.sqlalchemy_url)
with unit_of_work(settings) as session:
    _, key = create_api_key(session, settings, "p")
set_task_sender(lambda *a: None)
auth = {"Authorization": "Bearer " + key}
line = b'{"messages": [{"role": "user", "content": "hi"}]}\\n'
with TestClient(create_app(settings)) as client:
    file_id = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", line)},
                          data={"purpose": "fine-tune"}).json()["id"]
    grader = {"type": "string_check", "name": "g", "input": "a", "reference": "a", "operation": "eq"}
    body = {"model": "tiny-random-llama", "training_file": file_id,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader}}}
    assert client.post("/v1/fine_tuning/jobs/preflight", headers=auth, json=body).status_code == 200
    body["integrations"] = [{"type": "wandb", "wandb": {"project": "p"}},
                            {"type": "mlflow", "mlflow": {"experiment": "e"}}]
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()
    assert client.get("/v1/fine_tuning/jobs/" + job["id"], headers=auth).status_code == 200
    assert client.get("/v1/fine_tuning/jobs/" + job["id"] + "/events", headers=auth).status_code == 200
import workers.tasks  # what the Celery parent imports
heavy = sorted(m for m in ("torch", "transformers", "peft", "wandb", "mlflow") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_api_requests_and_worker_parent_import_no_torch(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
