"""The training entry point the job runner calls: `run_training(ctx) -> TrainingResult`.

The RL loop (GRPO-family RLVR on transformers) is not part of this build yet. Until it lands, a
job that gets here fails with an error that says so, after its files were validated and the job
was claimed. `RFT_TRAINER` names another entry point (`module:function`) with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from service.core.errors import TrainingUnavailable
from workers.context import JobContext, TrainingResult

Trainer = Callable[[JobContext], TrainingResult]


def run_training(ctx: JobContext) -> TrainingResult:
    raise TrainingUnavailable(
        "This rft build has no RL training loop yet: the job's files were validated and the job was "
        f"queued and claimed, but model {ctx.job['model']!r} cannot be trained. Upgrade rft to a release "
        "with the training loop, or set RFT_TRAINER to a trainer entry point.",
    )


def load_trainer(path: str) -> Trainer:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"RFT_TRAINER must look like 'package.module:function', got {path!r}")
    trainer: Trainer = getattr(importlib.import_module(module_name), attr)
    return trainer
