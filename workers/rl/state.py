"""What a training run carries from step to step and through a checkpoint, typed, and the one way
its random draws get their seeds.

A checkpoint's `trainer_state.pt` stores `TrainerState.to_dict()`: plain keys, the same ones the
untyped state of earlier versions had, so checkpoints written before and after this module resume
alike (`from_dict`)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed for one use of the job's randomness, named by `parts`: training step 3's
    sampling is `derive_seed(seed, "train", 3)`, its second refill round's `derive_seed(seed,
    "refill", 3, 2)`. A hash of the whole name, so no two uses share a seed by arithmetic (as when
    evaluation once took the seed of training step 7919)."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


@dataclass
class GuardState:
    """The stability guards' memory (`guards.py`)."""

    grad_norms: list[float] = field(default_factory=list)  # the last accepted updates' norms
    rollbacks: int = 0
    lr_scale: float = 1.0  # halved by each rollback
    entropy0: float | None = None  # the first step's entropy, for the collapse warning


@dataclass
class TrainerState:
    step: int = 0  # the last finished step
    baseline: dict[str, Any] | None = None  # the untouched model's evaluation
    evals: list[dict[str, Any]] = field(default_factory=list)  # every evaluation's metrics, by step
    resumed_at: int | None = None  # the step this process resumed from, for its ETA
    guard: GuardState = field(default_factory=GuardState)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainerState:
        known = {k: saved[k] for k in ("step", "baseline", "evals", "resumed_at") if k in saved}
        guard = saved.get("guard") or {}
        return cls(
            **known,
            guard=GuardState(
                **{k: guard[k] for k in ("grad_norms", "rollbacks", "lr_scale", "entropy0") if k in guard}
            ),
        )
