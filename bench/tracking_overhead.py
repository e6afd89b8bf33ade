"""What W&B tracking costs a real job: the walkthrough's arithmetic job (smollm2-135m-instruct, a
smaller slice of it) run twice in this process on one SQLite data dir, with no integration and then
with `{"type": "wandb"}` logging offline (WANDB_MODE=offline), side by side.

Reports, for each run: steps, the job's wall time, per-step training time; and for the tracked run
the time the training thread spent in the trackers (opening the run, each step's log, the final
selection, finishing it: `workers/tracking.py` timed around its calls), and what the offline run
folder holds. The GGUF is converted before either run, so neither pays for it.

    .venv/bin/python bench/tracking_overhead.py [--steps 6] [--valid 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.app import create_app  # noqa: E402
from service.auth.service import create_api_key  # noqa: E402
from service.core.db import unit_of_work  # noqa: E402
from service.core.migrate import upgrade  # noqa: E402
from service.core.queue import set_task_sender  # noqa: E402
from service.core.settings import Settings  # noqa: E402
from service.core.tables import Job, JobMetric  # noqa: E402
from service.models import registry  # noqa: E402
from workers import runner, tracking, validate  # noqa: E402

EXAMPLES = ROOT / "examples" / "arithmetic"
SPENT: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name].append(time.perf_counter() - t0)

    return wrapper


def run(
    client: TestClient, auth: dict[str, str], settings: Settings, files: tuple[str, str], wandb: bool
) -> dict[str, Any]:
    hyper = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 3, "eval_interval": 3,
             "max_completion_tokens": 16, "temperature": 0.7, "beta": 0.02}  # fmt: skip
    body: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "training_file": files[0],
        "validation_file": files[1],
        "seed": 42,
        "method": {
            "type": "reinforcement",
            "reinforcement": {"grader": json.loads((EXAMPLES / "grader.json").read_text()), "hyperparameters": hyper},
        },
    }
    if wandb:
        body["integrations"] = [{"type": "wandb", "wandb": {"project": "rft-bench", "tags": ["bench"]}}]
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    validate.validate_job(job_id, settings)
    SPENT.clear()
    t0 = time.perf_counter()
    runner.run_job(job_id, settings)
    wall = time.perf_counter() - t0
    with unit_of_work(settings) as session:
        job = session.query(Job).filter(Job.id == job_id).one()
        assert job.status == "succeeded", job.error
        steps = [m.data for m in session.query(JobMetric).filter(JobMetric.job_id == job_id).order_by(JobMetric.step)]
    return {"job": job_id, "wall": wall, "steps": steps, "spent": {k: list(v) for k, v in SPENT.items()}}


def folder_summary(root: Path, job_id: str) -> dict[str, Any]:
    [folder] = (root / "wandb").glob(f"offline-run-*-{job_id}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "folder": str(folder),
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in files},
        "bytes": sum(p.stat().st_size for p in files),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--valid", type=int, default=16)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rft-tracking-bench-"))
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"), "WANDB_SILENT": "true"})
    os.environ.pop("WANDB_API_KEY", None)
    settings = Settings(env="dev", data_dir=tmp / "data")
    upgrade(settings.sqlalchemy_url)
    with unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, "bench")
    set_task_sender(lambda *a: None)
    registry.load_fresh(registry.resolve("smollm2-135m-instruct"), settings)  # the GGUF, converted once
    for name in ("config", "log", "summary", "close"):
        setattr(tracking.Tracking, name, timed(name, getattr(tracking.Tracking, name)))
    train = (EXAMPLES / "train.jsonl").read_text().splitlines()[: 8 * args.steps]
    valid = (EXAMPLES / "valid.jsonl").read_text().splitlines()[: args.valid]
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        files = tuple(
            client.post(
                "/v1/files", headers=auth, files={"file": (n, "\n".join(lines) + "\n")}, data={"purpose": "fine-tune"}
            ).json()["id"]
            for n, lines in (("train.jsonl", train), ("valid.jsonl", valid))
        )
        results = {"off": run(client, auth, settings, files, False), "wandb": run(client, auth, settings, files, True)}  # type: ignore[arg-type]
    for name, r in results.items():
        mean = statistics.mean(s["timing"]["step"]["full_iteration"] for s in r["steps"])
        print(f"{name}: {len(r['steps'])} steps, job wall {r['wall']:.1f} s, training step mean {mean:.2f} s")
    spent = results["wandb"]["spent"]
    logs = spent.get("log", [])
    print(
        f"tracking on the training thread: open+config {sum(spent.get('config', [])):.3f} s, log per step mean "
        f"{1000 * statistics.mean(logs):.1f} ms (max {1000 * max(logs):.1f} ms, {len(logs)} steps), "
        f"summary {sum(spent.get('summary', [])):.3f} s, finish {sum(spent.get('close', [])):.3f} s"
    )
    print(json.dumps(folder_summary(tmp / "wb", results["wandb"]["job"]), indent=1))


if __name__ == "__main__":
    main()
