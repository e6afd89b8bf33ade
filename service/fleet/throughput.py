"""Throughput figures: how fast a model trains on one kind of device, for the pre-flight estimate.

After every training step its worker folds the step into a rolling figure kept per (model, device,
mode) in the `throughput` table: seconds per sampled sequence of a training step
(`timing.step.full_iteration` / (batch_size x group_size)), seconds per evaluated sequence on the
steps that evaluated (`timing.step.eval` / (validation examples x eval_samples)), and completion
tokens a second (the loop's `tokens_per_second`). Rolling means an exponential moving average in
which each step weighs `ALPHA`, so a figure follows a changed worker within about ten steps.

A step's time grows with the completions' length, so a figure is kept at the `max_completion_tokens`
of the first job measured and other jobs' steps are scaled to it linearly (and an estimate scales
back to its job's): an assumption, as is that evaluation sequences cost what training ones do where
no evaluation was measured yet. The device is the CUDA device's name ("NVIDIA H100 80GB HBM3"), or
"cpu x<cores>", as workers report it in the fleet (`Worker.device_name`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.core.tables import Throughput
from service.fleet import repository

ALPHA = 0.2


def device_name(cuda_name: str | None) -> str:
    """The throughput key of a device: the CUDA device's name, or `cpu x<cores>`."""
    return cuda_name or f"cpu x{os.cpu_count() or 1}"


@dataclass(frozen=True)
class JobShape:
    """What a job's steps cost in sequences: what the figures are divided by and multiplied with."""

    model: str
    mode: str  # "full" or "lora"
    sequences: int  # sampled per training step: batch_size x group_size
    eval_sequences: int  # per evaluation: validation examples x eval_samples
    max_completion_tokens: int


def _mix(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


def record(session: Session, device: str, shape: JobShape, metrics: dict[str, Any]) -> bool:
    """Fold one step's `metrics` into the figure of (model, device, mode); False where the step
    carries no timing (a trainer other than the RL loop)."""
    timing = (metrics.get("timing") or {}).get("step") or {}
    full, evaluation = timing.get("full_iteration"), timing.get("eval") or 0.0
    if not isinstance(full, int | float) or full <= 0 or shape.sequences <= 0:
        return False
    per_sequence = full / shape.sequences
    per_eval = evaluation / shape.eval_sequences if evaluation > 0 and shape.eval_sequences > 0 else None
    speed = float(metrics.get("tokens_per_second") or 0.0)

    def update(row: Throughput) -> None:
        scale = row.max_completion_tokens / shape.max_completion_tokens
        row.seconds_per_sequence = _mix(row.seconds_per_sequence, per_sequence * scale)
        if per_eval is not None:
            row.eval_seconds_per_sequence = _mix(row.eval_seconds_per_sequence, per_eval * scale)
        row.tokens_per_second = _mix(row.tokens_per_second, speed)
        row.steps += 1
        row.updated_at = time.time()

    first = {
        "steps": 1,
        "seconds_per_sequence": per_sequence,
        "eval_seconds_per_sequence": per_eval,
        "max_completion_tokens": shape.max_completion_tokens,
        "tokens_per_second": speed,
        "updated_at": time.time(),
    }
    repository.save_throughput(session, {"model": shape.model, "device": device, "mode": shape.mode}, update, first)
    return True


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float | None  # None: no measurement yet
    device: str | None
    basis: str  # where the figure comes from, in words


def estimate(
    session: Session, shape: JobShape, steps: int, evaluations: int, devices: list[str] | None
) -> TimeEstimate:
    """The job's training time from the freshest figure of the first of `devices` (the worker
    classes that would run it, the router's choice first) that has one; of any device where the
    fleet reports no workers (`devices` None)."""
    rows = repository.throughput(session, shape.model, shape.mode, devices)
    if devices:
        rows.sort(key=lambda r: devices.index(r.device))
    if not rows:
        where = f" on {', '.join(devices)}" if devices else ""
        return TimeEstimate(
            None,
            devices[0] if devices else None,
            f"no measurement yet: no {shape.mode} fine-tuning step of {shape.model!r} has run{where}",
        )
    row = rows[0]
    scale = shape.max_completion_tokens / row.max_completion_tokens
    per_eval = row.eval_seconds_per_sequence or row.seconds_per_sequence
    training = steps * shape.sequences * row.seconds_per_sequence
    seconds = (training + evaluations * shape.eval_sequences * per_eval) * scale
    eval_note = "" if row.eval_seconds_per_sequence else "; evaluation not measured yet, taken at the training rate"
    fleet_note = "" if devices else "; the fleet reports no workers, so the freshest figure of any device"
    basis = (
        f"measured on {row.device}: {row.seconds_per_sequence:.4g} s per sampled sequence over the last "
        f"{row.steps} training steps (rolling), at max_completion_tokens={row.max_completion_tokens}"
        f"{' and scaled linearly to ' + str(shape.max_completion_tokens) if scale != 1 else ''}{eval_note}"
        f"{fleet_note}; model loading and checkpoint writes not included"
    )
    return TimeEstimate(seconds, row.device, basis)
