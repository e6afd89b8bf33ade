"""The worker's half of the throughput figures (service/fleet/throughput.py): after each RL step,
fold its timing into the figure of this job's model, this process's device and the job's mode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.core.settings import Settings
from service.fleet.throughput import JobShape, device_name, record
from service.jobs.schemas import samples_per_prompt
from workers.retry import in_transaction

log = logging.getLogger(__name__)


def record_throughput(settings: Settings, job: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Best effort: a figure is never worth a job, so a failure is logged and forgotten."""
    if not (metrics.get("timing") or {}).get("step"):
        return  # not the RL loop's metrics (a scripted trainer's): nothing to measure
    try:
        shape = job_shape(job)
        if shape is None:
            return
        import torch  # loaded already: the loop that reported timing runs on it

        device = device_name(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        in_transaction(settings, lambda session: record(session, device, shape, metrics))
    except Exception:
        log.warning("could not record the throughput of job %s", job.get("id"), exc_info=True)


def job_shape(job: dict[str, Any]) -> JobShape | None:
    """The job's shape from its resolved hyperparameters (None until the trainer has echoed them)."""
    hp = job.get("method", {}).get("reinforcement", {}).get("hyperparameters", {})
    batch, eval_samples = hp.get("batch_size"), hp.get("eval_samples", 1)
    if not isinstance(batch, int) or not isinstance(eval_samples, int):
        return None
    if "_eval_examples" not in job:  # evaluation runs over the validation file, else the training file
        path = job.get("validation_path") or job.get("training_path")
        job["_eval_examples"] = _examples(Path(path)) if path else 0
    return JobShape(
        model=job["model"],
        mode="lora" if int(hp.get("lora_rank") or 0) else "full",
        sequences=batch * samples_per_prompt(hp.get("compute_multiplier", "auto")),
        eval_sequences=int(job["_eval_examples"]) * eval_samples,
        max_completion_tokens=int(hp.get("max_completion_tokens", 64)),
    )


def _examples(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())
