"""The real RL trainer with faults a chaos test can place exactly (RFT_TRAINER=tests.support.faults:rl).

- `RFT_TEST_STEP_SLEEP`: seconds to wait after each step's metrics are recorded, so that a test can
  act while the job is mid-training.
- `RFT_TEST_KILL_IN_CHECKPOINT=STEP:WHERE`: SIGKILL this process while it saves the checkpoint of
  STEP; WHERE is `write` (half the files are in the staging folder) or `commit` (the folder is in
  place, its database row not yet written).

The faults wrap the JobContext the runner hands over; the production code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.context import JobContext, TrainingResult
from workers.training import run_training


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def rl(ctx: JobContext) -> TrainingResult:
    pause = float(os.environ.get("RFT_TEST_STEP_SLEEP", "0"))
    kill_step, _, where = os.environ.get("RFT_TEST_KILL_IN_CHECKPOINT", "").partition(":")
    record, save = ctx.metrics, ctx.save_checkpoint

    def slow_metrics(step: int, data: dict[str, Any]) -> None:
        record(step, data)
        time.sleep(pause)

    def faulty_save(step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        if str(step) != kill_step:
            return save(step, write, metrics)

        def half_write(folder: Path) -> None:
            write(folder)
            if where == "write":
                for file in sorted(folder.iterdir())[::2]:  # truncate every other file
                    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
                _die()

        commit = ctx.storage.commit_dir

        def commit_then_die(staging: Path, key: str) -> None:
            commit(staging, key)
            _die()
            raise AssertionError("unreachable")

        ctx.storage.commit_dir = commit_then_die  # type: ignore[method-assign]
        return save(step, half_write, metrics)

    ctx.metrics = slow_metrics  # type: ignore[method-assign]
    ctx.save_checkpoint = faulty_save  # type: ignore[method-assign]
    return run_training(ctx)
