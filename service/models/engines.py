"""Which rollout engine samples a job's completions: `torch` (our own decode loop over the trainer's
module, always there) or `vllm` (a separate engine holding its own copy of the weights).

The job's `rollout_engine` extra names one; its `auto` defers to `RFT_ROLLOUT_ENGINE`, whose `auto`
takes vLLM wherever `vllm_unavailable` finds no reason against it. A job that asks for vLLM where
it is unavailable is refused at creation with that reason, and fails with it if the worker's host
differs. Importing this module is cheap: the API calls it, and the API never loads torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from service.core.errors import InvalidRequest
from service.core.settings import Settings

EngineName = Literal["torch", "vllm"]
ENGINE_PARAM = "method.reinforcement.hyperparameters.rollout_engine"
VLLM_ENGINE_MODULE = "workers.rl.vllm_engine"  # holds `VllmEngine`, a `workers.rl.engine.RolloutEngine`


class EngineUnavailable(InvalidRequest):
    """The job asked for an engine this server cannot run (a 400 at creation, a failed job later)."""

    code = "rollout_engine_unavailable"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"rollout_engine {name!r} is unavailable on this server: {reason}. "
            "Use 'torch' or 'auto', or ask the operator to install it.",
            param=ENGINE_PARAM,
        )


def vllm_unavailable(settings: Settings, model_name: str) -> str | None:
    """Why vLLM cannot sample `model_name` here, or None where it can.

    vLLM runs in an interpreter of its own (`RFT_VLLM_PYTHON`), apart from the service's packages,
    and through the engine module that drives it. Which architectures it serves is not checked yet:
    `model_name` is here so that this one probe grows that check."""
    del model_name
    if not settings.vllm_python:
        return "RFT_VLLM_PYTHON is not set (the path of a Python interpreter with vllm installed)"
    if not Path(settings.vllm_python).is_file():
        return f"RFT_VLLM_PYTHON={settings.vllm_python} is not a file"
    if importlib.util.find_spec(VLLM_ENGINE_MODULE) is None:
        return f"this build has no vLLM engine ({VLLM_ENGINE_MODULE} is missing)"
    return None


def choose_engine(requested: str, settings: Settings, model_name: str) -> EngineName:
    """The engine a job runs: its own choice, else the server's; `auto` is vLLM where usable."""
    choice = settings.rollout_engine if requested == "auto" else requested
    if choice == "torch":
        return "torch"
    reason = vllm_unavailable(settings, model_name)
    if choice == "vllm":
        if reason is not None:
            raise EngineUnavailable("vllm", reason)
        return "vllm"
    if choice != "auto":
        raise InvalidRequest(f"rollout_engine must be 'auto', 'torch' or 'vllm', got {choice!r}.", param=ENGINE_PARAM)
    return "torch" if reason is not None else "vllm"
