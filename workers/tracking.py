"""Experiment tracking: a job's `integrations` (W&B, MLflow) fed from where the job's state is written.

`JobContext` calls it: `config` with the resolved hyperparameters when the trainer echoes them,
`log` with each step's metrics once they are recorded, `summary` with the final model's selection,
and `close` when the job ends here (each attempt ends its run; a resumed job continues the same
run: W&B by the job's id, MLflow by the run tagged with it). Metrics are flattened to `/`-joined
keys (`timing/step/sampling`, per grader `scores/graders/<name>/train_reward_mean`) with the step as
the x axis; the evaluation samples go to a table.

A tracker never fails the job: its package missing, a server unreachable, credentials refused, or
any error later on, and that tracker is dropped for the rest of the attempt with a `warn` event
saying what happened; training goes on.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from service.core.settings import Settings
from service.jobs.integrations import TRACKER_NAMES

log = logging.getLogger(__name__)
SAMPLE_COLUMNS = ["step", "prompt", "completion", "reward", "errors", "scores"]
Notify = Callable[[str, str, dict[str, Any], str], None]  # (level, message, data, dedupe key)


class Tracker(Protocol):
    def update_config(self, config: dict[str, Any]) -> None: ...
    def log(self, step: int, scalars: dict[str, float], samples: list[list[Any]]) -> None: ...
    def summary(self, scalars: dict[str, float], data: dict[str, Any]) -> None: ...
    def finish(self, status: str) -> None: ...


def _key(name: str) -> str:
    # What both trackers accept in a key (MLflow's rule is the narrower): a grader's name may hold anything.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics dict under `/`-joined keys; lists of named dicts by their names."""
    out: dict[str, float] = {}
    for name, value in data.items():
        key = _key(f"{prefix}{name}")
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, dict):
            out |= flatten(value, f"{key}/")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    rest = {k: v for k, v in item.items() if k not in ("name", "type")}
                    out |= flatten(rest, f"{key}/{item['name']}/")
    return out


def sample_rows(step: int, samples: list[dict[str, Any]]) -> list[list[Any]]:
    """Evaluation samples as table rows (`SAMPLE_COLUMNS`)."""
    import json

    return [
        [
            step,
            s.get("prompt") if isinstance(s.get("prompt"), str) else json.dumps(s.get("prompt")),
            s.get("completion"),
            s.get("reward"),
            ", ".join(s.get("errors") or []),
            json.dumps(s.get("scores") or {}, sort_keys=True),
        ]
        for s in samples
    ]


def _open(kind: str, spec: dict[str, Any], job: dict[str, Any], config: dict[str, Any], settings: Settings) -> Any:
    if kind == "wandb":
        from workers.trackers.wandb_run import WandbRun

        return WandbRun(spec, job, config, settings)
    from workers.trackers.mlflow_run import MlflowRun

    return MlflowRun(spec, job, config)


class Tracking:
    """The job's trackers, opened on first use, each dropped with a `warn` event on its first failure."""

    def __init__(self, job: dict[str, Any], settings: Settings, notify: Notify) -> None:
        self.job, self.settings, self.notify = job, settings, notify
        entries = job.get("integrations") or []
        self.specs = [(i, entry["type"], entry.get(entry["type"]) or {}) for i, entry in enumerate(entries)]
        self.open: dict[int, Tracker] = {}
        self.started = False
        self.config_values: dict[str, Any] = {}

    def _config(self) -> dict[str, Any]:
        job = self.job
        hyperparameters = job.get("method", {}).get("reinforcement", {}).get("hyperparameters", {})
        keys = ("id", "model", "training_file", "validation_file", "seed", "suffix")
        return {
            **{("job_id" if k == "id" else k): job.get(k) for k in keys},
            "hyperparameters": {**hyperparameters, **self.config_values},
        }

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        for index, kind, spec in self.specs:
            opening = partial(_open, kind, spec, self.job, self._config(), self.settings)
            tracker = self._guard(index, kind, "starting", opening)
            if tracker is not None:
                self.open[index] = tracker
                for level, message, data in getattr(tracker, "notes", []):
                    self.notify(level, message, data, f"integration:{index}:{self.job.get('attempts', 0)}:opened")

    def _guard(self, index: int, kind: str, doing: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # a tracker's failure of any kind must not reach training
            log.warning("%s tracking failed while %s", kind, doing, exc_info=True)
            self.open.pop(index, None)
            missing = isinstance(exc, ImportError)
            hint = " Install the trackers extra on the workers: pip install 'rft[trackers]'." if missing else ""
            self.notify(
                "warn",
                f"{TRACKER_NAMES.get(kind, kind)} tracking failed while {doing}: {type(exc).__name__}: "
                f"{str(exc)[:500]}.{hint} Training continues without it.",
                {"integration": index, "type": kind, "error": f"{type(exc).__name__}: {str(exc)[:500]}"},
                f"integration:{index}:{self.job.get('attempts', 0)}:failed",
            )
            return None

    def _each(self, doing: str, call: Callable[[Tracker], None]) -> None:
        for index, kind, _ in self.specs:
            tracker = self.open.get(index)
            if tracker is not None:
                self._guard(index, kind, doing, partial(call, tracker))

    def config(self, hyperparameters: dict[str, Any]) -> None:
        """The hyperparameters as the trainer resolved them."""
        if not self.specs:
            return
        self.config_values = dict(hyperparameters)
        if self.started:
            self._each("logging the configuration", lambda t: t.update_config(self._config()))
        else:
            self._start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.specs:
            return
        self._start()
        scalars = flatten({k: v for k, v in metrics.items() if k not in ("step", "valid_samples")})
        samples = sample_rows(step, metrics.get("valid_samples") or [])
        self._each(f"logging step {step}", lambda t: t.log(step, scalars, samples))

    def summary(self, data: dict[str, Any]) -> None:
        """The final model's selection."""
        if not self.specs:
            return
        self._start()
        self._each("logging the final selection", lambda t: t.summary(flatten(data, "final/"), data))

    def close(self, status: str) -> None:
        """End this attempt's runs: `status` is how the job ended here (succeeded, failed, cancelled,
        paused, requeued)."""
        self._each("finishing", lambda t: t.finish(status))
        self.open.clear()
