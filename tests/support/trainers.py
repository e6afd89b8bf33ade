"""A scripted trainer for testing the job runner's control flow before the RL loop exists.

It stands in for `workers.training.run_training` (set RFT_TRAINER to `tests.support.trainers:ticking`):
each step sleeps, records metrics, checkpoints its step counter every `RFT_TEST_CKPT_EVERY` steps,
and honours cancel and pause exactly as a real trainer must: after the current step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from workers.context import JobContext, TrainingResult


def _write_state(step: int) -> object:
    def write(folder: Path) -> None:
        (folder / "state.json").write_text(json.dumps({"step": step}))

    return write


def ticking(ctx: JobContext) -> TrainingResult:
    total = int(os.environ.get("RFT_TEST_STEPS", "6"))
    delay = float(os.environ.get("RFT_TEST_STEP_SECONDS", "0.2"))
    every = int(os.environ.get("RFT_TEST_CKPT_EVERY", "2"))
    latest = ctx.latest_checkpoint()
    start = json.loads((latest[1] / "state.json").read_text())["step"] if latest else 0
    if start:
        ctx.event(f"Resuming from checkpoint at step {start}.", dedupe_key=f"resume:{start}")
    for step in range(start + 1, total + 1):
        time.sleep(delay)
        ctx.metrics(step, {"total_steps": total, "train_reward_mean": step / total})
        if step % every == 0 or step == total:
            ctx.save_checkpoint(step, _write_state(step), {"train_reward_mean": step / total})  # type: ignore[arg-type]
        request = ctx.control()
        if request == "cancel":
            return TrainingResult("cancelled")
        if request in ("pause", "stop"):
            ctx.save_checkpoint(step, _write_state(step), {"train_reward_mean": step / total})  # type: ignore[arg-type]
            return TrainingResult("paused" if request == "pause" else "requeued")
    return TrainingResult("succeeded", trained_tokens=total * 100)


def crashing(ctx: JobContext) -> TrainingResult:
    raise RuntimeError("boom in step 1")


def crashing_after_two_steps(ctx: JobContext) -> TrainingResult:
    for step in (1, 2):
        ctx.metrics(step, {"total_steps": 6, "train_reward_mean": step / 6})
    raise RuntimeError("boom in step 3")
