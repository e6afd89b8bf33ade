"""Weights & Biases: one run per job (its id is the job's, so a resumed job continues it).

Online where the worker has WANDB_API_KEY (runs go to that key's account; `entity` and `project`
place them in it); without a key, or with WANDB_MODE=offline, the run is written to a folder under
$WANDB_DIR (default `<RFT_DATA_DIR>/wandb`) on the worker, which `wandb sync <folder>` uploads later.
An event names the run's URL or its folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from service.core.settings import Settings
from workers.tracking import SAMPLE_COLUMNS

EXIT_CODES = {"succeeded": 0, "paused": 0, "requeued": 0, "cancelled": 1, "failed": 1}


class WandbRun:
    def __init__(self, spec: dict[str, Any], job: dict[str, Any], config: dict[str, Any], settings: Settings) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        root = Path(os.environ.get("WANDB_DIR") or settings.data_dir / "wandb")
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=spec["project"],
            entity=spec.get("entity"),
            name=spec.get("name") or job["id"],
            tags=spec.get("tags"),
            id=job["id"],
            resume="allow",
            dir=str(root),
            mode=mode,  # type: ignore[arg-type]
            config=config,
            settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False),
        )
        if mode == "offline":
            folder = Path(self.run.dir).parent
            why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no WANDB_API_KEY on the worker"
            message = (
                f"Weights & Biases run {job['id']} is logged offline ({why}) to {folder} on worker "
                f"{socket.gethostname()}; upload it with `wandb sync {folder}`."
            )
            data: dict[str, Any] = {"type": "wandb", "mode": "offline", "folder": str(folder)}
            self.notes = [("info", message, data)]
        else:
            url = self.run.url
            data = {"type": "wandb", "mode": mode, "url": url}
            self.notes = [("info", f"Logging to Weights & Biases: {url}", data)]

    def update_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, scalars: dict[str, float], samples: list[list[Any]]) -> None:
        row: dict[str, Any] = dict(scalars)
        if samples:
            row["valid_samples"] = self.wandb.Table(columns=list[Any](SAMPLE_COLUMNS), data=samples)
        self.run.log(row, step=step)

    def summary(self, scalars: dict[str, float], data: dict[str, Any]) -> None:
        self.run.summary.update({**scalars, "final/fine_tuned_model": data.get("fine_tuned_model")})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))
