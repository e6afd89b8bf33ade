"""A finished job's results file: its per-step metrics as CSV, a file of purpose `fine-tune-results`.

OpenAI attaches one such file to a finished job (`result_files`) and serves it through the Files API.
It documents the columns of supervised jobs' file (`step, train_loss, train_accuracy, valid_loss,
valid_mean_token_accuracy`), not those of RFT jobs; for RFT it documents the metrics of a step (the
`metrics` events' data), so those are the columns, under OpenAI's names and first: `step`, `total_steps`,
`train_reward_mean`, `valid_reward_mean` (steps that evaluated), `full_valid_mean_reward` (the last step),
`completion_tokens_mean`, each grader's `scores.<name>.train_reward_mean` / `.valid_reward_mean`, the
grader error rates `*_error_mean`, and `timing.step.*` in seconds. Ours follow, sorted by name (kl,
entropy, loss, grad_norm, lr, tokens_per_second, ...): a nested value as `outer.inner`, a list as JSON.
A cell is empty where that step did not report the column.

A job gets the file when it finishes (succeeded, failed or cancelled) having recorded at least one
step; a job that failed validation has none. A store that cannot take the file (full, unreachable)
leaves the job finished without it, and a warn event says why. It is written once: a finish written again (a retried
transaction) or a job that already has it leaves it as it is; deleting the file later leaves the job as
it is, its id still listed in `result_files`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.core.storage import Storage
from service.core.tables import Job
from service.files.service import record_generated
from service.jobs import repository

log = logging.getLogger(__name__)
PURPOSE = "fine-tune-results"
OPENAI_COLUMNS = (
    "step",
    "total_steps",
    "train_reward_mean",
    "valid_reward_mean",
    "full_valid_mean_reward",
    "completion_tokens_mean",
)
TIMING_COLUMNS = ("timing.step.sampling", "timing.step.training", "timing.step.eval", "timing.step.full_iteration")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One row's cells: nested dicts as `outer.inner`, each grader of `scores.graders` as `scores.<name>.*`."""
    cells: dict[str, Any] = {}
    for key, value in data.items():
        graders = value.get("graders") if key == "scores" and isinstance(value, dict) else None
        if isinstance(graders, list):
            for grader in graders:
                name = grader.get("name", "?")
                cells |= {f"scores.{name}.{k}": v for k, v in grader.items() if k not in ("name", "type")}
        elif isinstance(value, dict):
            cells |= flatten(value, f"{prefix}{key}.")
        else:
            cells[f"{prefix}{key}"] = value
    return cells


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: set[str] = set().union(*rows) if rows else {"step"}
    first = [c for c in OPENAI_COLUMNS if c in seen]
    first += sorted(c for c in seen if c.startswith("scores."))
    first += sorted(c for c in seen if c.endswith("_error_mean"))
    first += [c for c in TIMING_COLUMNS if c in seen]
    return first + sorted(seen - set(first))


def to_csv(metrics: Sequence[tuple[int, dict[str, Any]]]) -> bytes:
    """The CSV of `(step, metrics)` pairs, in step order."""
    rows = [{**flatten(data), "step": step} for step, data in sorted(metrics, key=lambda m: m[0])]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    return out.getvalue().encode()


def attach(session: Session, storage: Storage, job: Job) -> str | None:
    """Give the finished `job` its results file, in the transaction that finishes it; its id (None
    where the job has one already or recorded no step)."""
    if job.result_files:
        return None
    metrics = repository.metrics_of(session, job.id)
    if not metrics:
        return None
    # One key per job: a finish retried after its bytes were written overwrites them, never leaves a second copy.
    key, content = f"files/{job.project_id}/results-{job.id}", to_csv(metrics)
    try:
        storage.put_bytes(key, content)
    except Exception as exc:  # a full or unreachable store (OSError, boto's errors) must not undo the finish
        log.warning("job %s: results file not written: %s", job.id, exc)
        message = (
            f"The results file could not be written ({type(exc).__name__}: {exc}); the job's metrics "
            "events hold the same figures."
        )
        repository.add_event(session, job, message, level="warn")
        return None
    row = record_generated(session, job.project_id, key, f"{job.id}-step_metrics.csv", PURPOSE, content)
    job.result_files = [row.id]
    session.flush()
    return row.id
