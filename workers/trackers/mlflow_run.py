"""MLflow: one run per job in the integration's experiment, tagged `rft.job_id` so a resumed job
continues it. Hyperparameters go to params (once each: MLflow's params never change), metrics by
step, evaluation samples to `valid_samples/step_NNNNNN.json` artifacts in MLflow's table layout
(`{"columns": [...], "data": [[...]]}`), and the final selection to `final/...` metrics, the
`rft.fine_tuned_model` tag and `final_selection.json`.

The server is the integration's `tracking_uri` (one of RFT_MLFLOW_TRACKING_URIS, checked at
creation) or the worker's MLFLOW_TRACKING_URI. Requests retry at most twice and time out after 15 s
unless MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT say otherwise, so an
unreachable server costs a step seconds, not minutes, before the tracker is dropped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from workers.tracking import SAMPLE_COLUMNS

STATUSES = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}  # paused: stays RUNNING
JOB_TAG = "rft.job_id"


class MlflowRun:
    def __init__(self, spec: dict[str, Any], job: dict[str, Any], config: dict[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        uri = spec.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RuntimeError(
                "no tracking server: the integration names no tracking_uri and the worker has no MLFLOW_TRACKING_URI"
            )
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(spec["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(spec["experiment"])
        mine = f"tags.`{JOB_TAG}` = '{job['id']}'"
        found = self.client.search_runs([experiment_id], filter_string=mine, max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {JOB_TAG: job["id"], **{tag: "" for tag in spec.get("tags") or []}}
            run = self.client.create_run(experiment_id, run_name=spec.get("run_name") or job["id"], tags=tags)
            self.run_id = run.info.run_id
        self.logged_params: set[str] = {k for k in (found[0].data.params if found else {})}
        self.update_config(config)
        self.notes = [
            (
                "info",
                f"Logging to MLflow run {self.run_id} in experiment {spec['experiment']!r} at {uri}.",
                {"type": "mlflow", "run_id": self.run_id, "experiment_id": experiment_id},
            )
        ]

    def update_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = {k: str(v) for k, v in _params(config).items() if k not in self.logged_params}
        if values:
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in values.items()])
            self.logged_params |= set(values)

    def log(self, step: int, scalars: dict[str, float], samples: list[list[Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
        if samples:
            table = {"columns": SAMPLE_COLUMNS, "data": samples}
            self.client.log_dict(self.run_id, table, f"valid_samples/step_{step:06d}.json")

    def summary(self, scalars: dict[str, float], data: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(data.get("chosen_step") or 0)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
        if data.get("fine_tuned_model"):
            self.client.set_tag(self.run_id, "rft.fine_tuned_model", data["fine_tuned_model"])
        self.client.log_dict(self.run_id, data, "final_selection.json")

    def finish(self, status: str) -> None:
        if status in STATUSES:
            self.client.set_terminated(self.run_id, STATUSES[status])


def _params(config: dict[str, Any]) -> dict[str, Any]:
    """The config's leaves under `/`-joined keys (strings and lists kept, unlike metrics)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": v for k, v in _params(value).items()}
        elif value is not None:
            out[key] = value
    return out
