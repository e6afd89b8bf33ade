"""The worker's memory plan for a job: `service.models.memory_plan` with what only the worker knows
(the device and its memory, the prompts' lengths in the model's tokens), deciding the micro-batch
and gradient checkpointing where the job left them at `auto`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from service.core.settings import Settings
from service.models import memory_plan
from service.models.templates import render_prompt
from workers.rl.config import RLConfig
from workers.rl.data import Example
from workers.rl.policy import autocast_dtype, reuses_prefix
from workers.rl.vllm_engine import sampling_dtype


def device_memory(settings: Settings, device: str, ranks: int = 1) -> int:
    """Bytes one rank of a job may use: `RFT_WORKER_MEMORY_GIB`, else its GPU's memory, else its
    share of the host's (the ranks of a job on a CPU share one memory)."""
    if settings.worker_memory_gib:
        return int(settings.worker_memory_gib * memory_plan.GIB)
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return memory_plan.host_memory() // ranks


def workload(
    cfg: RLConfig, model: Any, tokenizer: Any, examples: list[Example], settings: Settings, device: str
) -> memory_plan.Workload:
    """What `model` training under `cfg` holds on `device`, its prompts measured in `tokenizer`'s tokens."""
    bf16 = autocast_dtype(settings.training_precision, device) is not None
    # one batched call: a fast tokenizer encodes the whole training file at once (a job may hold 50,000 lines)
    prompts = [render_prompt(tokenizer, e.messages) for e in examples]
    longest = max((len(ids) for ids in tokenizer(prompts)["input_ids"]), default=1) if prompts else 1
    return memory_plan.Workload(
        prompts=cfg.batch_size,
        group_size=cfg.group_size,
        prompt_tokens=longest,
        completion_tokens=cfg.max_completion_tokens,
        micro_batch_size=cfg.micro_batch_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        lora_rank=cfg.lora_rank,
        lora_targets=cfg.lora_target_modules,
        beta=cfg.beta,
        device="cuda" if device == "cuda" else "cpu",
        bf16=bf16,
        engine="vllm" if cfg.rollout_engine == "vllm" else "torch",
        vllm_kv_cache_gib=settings.vllm_kv_cache_gib,
        vllm_bf16=sampling_dtype(model, settings) == torch.bfloat16,
        keeps_prefix=reuses_prefix(model, cfg) and cfg.n_devices == 1,  # as `Loop.reuse_prefix`
        devices=cfg.n_devices,
        sharded=cfg.sharded,
    )


def plan(
    cfg: RLConfig,
    hyperparameters: dict[str, Any],
    model_config: dict[str, Any],
    work: memory_plan.Workload,
    budget: int,
) -> tuple[RLConfig, memory_plan.Estimate | None]:
    """`cfg` with the micro-batch and checkpointing that fit `budget`, and the plan; (cfg, None) for
    a model whose config the planner cannot count. A job that cannot fit is a 400 naming why."""
    try:
        shape = memory_plan.Shape.from_config(model_config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return cfg, None
    auto = {k: hyperparameters.get(k, "auto") == "auto" for k in ("micro_batch_size", "gradient_checkpointing")}
    chosen = memory_plan.fit(
        shape,
        work,
        budget,
        micro_batch_auto=auto["micro_batch_size"],
        checkpointing_auto=auto["gradient_checkpointing"],
    )
    w = chosen.workload
    return replace(cfg, micro_batch_size=w.micro_batch_size, gradient_checkpointing=w.gradient_checkpointing), chosen


def event(estimate: memory_plan.Estimate, budget: int) -> tuple[str, dict[str, Any]]:
    """The job event that shows the plan: its message and data."""
    w = estimate.workload
    message = f"Memory plan: {estimate.describe()}, of the {memory_plan.gib(budget)} this worker has."
    return message, {
        "peak": estimate.peak,
        "budget": budget,
        "parts": estimate.parts,
        "parameters": estimate.parameters,
        "micro_batch_size": w.micro_batch_size,
        "gradient_checkpointing": w.gradient_checkpointing,
        "prompt_tokens": w.prompt_tokens,
    }
