"""Budget caps, hyperparameter extras of ours: `max_wall_seconds` (the job's running time on workers,
over all its attempts; `Job.running_seconds`) and `max_tokens` (its trained tokens: prompt and
completion tokens of every sequence trained on; `Job.trained_tokens`).

The worker checks them where the trainer asks for control after each step (`JobContext.control`):
a cap reached before the last step pauses the job with a checkpoint and a `warn` event naming the
cap and the figures. A paused job resumes only once the cap it reached is raised or removed, which
`POST /v1/fine_tuning/jobs/{id}/resume` takes in its body (`{"max_tokens": 20000}`, null removes it;
`rft jobs resume ID --max-tokens 20000`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAPS = ("max_wall_seconds", "max_tokens")


@dataclass(frozen=True)
class Reached:
    cap: str
    limit: int
    used: float

    def describe(self) -> str:
        if self.cap == "max_wall_seconds":
            return f"max_wall_seconds {self.limit:,} reached: the job has run {self.used:,.0f} s on workers"
        return f"max_tokens {self.limit:,} reached: the job has trained on {int(self.used):,} tokens"

    def data(self) -> dict[str, Any]:
        return {"cap": self.cap, "limit": self.limit, "used": self.used}


def caps(method: dict[str, Any]) -> dict[str, int | None]:
    hyperparameters = method.get("reinforcement", {}).get("hyperparameters", {})
    return {name: hyperparameters.get(name) for name in CAPS}


def reached(method: dict[str, Any], running_seconds: float | None, trained_tokens: int | None) -> Reached | None:
    """The first cap of the job's `method` that its figures have reached, if any."""
    limits = caps(method)
    used = {"max_wall_seconds": float(running_seconds or 0.0), "max_tokens": float(trained_tokens or 0)}
    for name in CAPS:
        limit = limits[name]
        if limit is not None and used[name] >= limit:
            return Reached(name, int(limit), used[name])
    return None


def with_caps(method: dict[str, Any], changes: dict[str, int | None]) -> dict[str, Any]:
    """`method` with the caps in `changes` set (None removes one)."""
    reinforcement = method.get("reinforcement", {})
    hyperparameters = {**reinforcement.get("hyperparameters", {}), **changes}
    return {**method, "reinforcement": {**reinforcement, "hyperparameters": hyperparameters}}
