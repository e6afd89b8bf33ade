"""The training entry point the job runner calls: `run_training(ctx) -> TrainingResult`.

The default is the RL loop in `workers.rl.loop`, imported on first use so the Celery parent process
never imports torch (or touches CUDA) before it forks the process that runs the job.
`RFT_TRAINER` names another entry point (`module:function`) with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from workers.context import JobContext, TrainingResult

Trainer = Callable[[JobContext], TrainingResult]


def run_training(ctx: JobContext) -> TrainingResult:
    from workers.rl.loop import run_training as rl_loop

    return rl_loop(ctx)


def load_trainer(path: str) -> Trainer:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"RFT_TRAINER must look like 'package.module:function', got {path!r}")
    trainer: Trainer = getattr(importlib.import_module(module_name), attr)
    return trainer
