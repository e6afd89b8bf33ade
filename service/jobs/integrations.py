"""A job's `integrations`, checked at creation: what the API can know without the trackers' packages.

The API never imports wandb or mlflow (they are the workers' optional `trackers` extra). It refuses
at creation an integration that no live training worker could run, by the trackers each worker
reports in its heartbeat (`Worker.trackers`); where no worker reports them (none live, or older
versions), the job is accepted and a worker without the package says so in a `warn` event while
the job trains on. An MLflow `tracking_uri` must be one the operator allows, since the workers send
the job's metrics there.
"""

from __future__ import annotations

import importlib.util

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.tables import Worker
from service.jobs.schemas import Integration

TRACKERS = ("wandb", "mlflow")
TRACKER_NAMES = {"wandb": "Weights & Biases", "mlflow": "MLflow"}
EXTRA = "pip install 'rft[trackers]'"


def installed_trackers() -> list[str]:
    """The trackers whose client package this environment has (located, never imported)."""
    return [name for name in TRACKERS if importlib.util.find_spec(name) is not None]


def check_integrations(integrations: list[Integration], settings: Settings, fleet: list[Worker]) -> None:
    reporting = [w for w in fleet if w.trackers is not None]
    for i, integration in enumerate(integrations):
        param = f"integrations.{i}"
        if integration.mlflow is not None and integration.mlflow.tracking_uri is not None:
            uri = integration.mlflow.tracking_uri
            if uri not in settings.mlflow_tracking_uris:
                allowed = ", ".join(repr(u) for u in settings.mlflow_tracking_uris) or "none"
                raise InvalidRequest(
                    f"{param}.mlflow.tracking_uri {uri!r} is not a tracking server this service logs to "
                    f"(allowed: {allowed}; the operator sets RFT_MLFLOW_TRACKING_URIS). Leave it out to use "
                    "the workers' MLFLOW_TRACKING_URI.",
                    param=f"{param}.mlflow.tracking_uri",
                )
        if reporting and not any(integration.type in (w.trackers or []) for w in reporting):
            raise InvalidRequest(
                f"{param}.type {integration.type!r}: no live training worker has the {integration.type} package "
                f"installed, so this job could not log to it. Install the trackers extra on the workers "
                f"({EXTRA}) and restart them, or leave this integration out.",
                param=f"{param}.type",
            )


def stored(integrations: list[Integration] | None) -> list[dict[str, object]] | None:
    """The job's integrations as its object shows them: each `type` and the settings under its name."""
    if not integrations:
        return None
    out: list[dict[str, object]] = []
    for integration in integrations:
        settings = getattr(integration, integration.type)
        out.append({"type": integration.type, integration.type: settings.model_dump()})
    return out
