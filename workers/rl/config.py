"""Resolving a job's hyperparameters: every "auto" becomes a value by a documented rule.

Rules (n = training examples):
- group_size (samples per prompt) = clamp(round(4 * compute_multiplier), 2, 64); auto multiplier = 1.
- batch_size (prompts per step) = min(8, n); n_epochs = 3 when auto.
- learning_rate = 1e-5 (full fine-tuning) or 1e-4 (LoRA) * learning_rate_multiplier (auto = 1),
  AdamW, linear warmup.
- eval_interval = max(1, total_steps // 5); eval_samples = 1.
- micro_batch_size (sequences per forward/backward) = min(group_size * batch_size, whole groups of at most
  16 sequences, at least one group), so a group's shared prompt is computed once.
- rollout_engine: the engine `service.models.engines.choose_engine` picks (`with_engine`);
  importance_sampling_correction = token where that engine is not the trainer, none where it is.
- n_devices = the devices the worker offers a job (`RFT_WORKER_DEVICES`, else its CUDA devices, else 1);
  full fine-tuning shards the layers over them (FSDP2), LoRA replicates the model (data parallel).
- micro_batch_size and gradient_checkpointing under auto are then the worker's memory plan's
  (`workers/rl/plan.py`): the rule above and no checkpointing (it costs about a third more compute)
  where that fits the worker's memory, else smaller micro-batches, then checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from service.jobs.schemas import samples_per_prompt

BASE_LEARNING_RATE = 1e-5
LORA_LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class RLConfig:
    n_epochs: int
    batch_size: int
    group_size: int
    learning_rate: float
    learning_rate_multiplier: float
    compute_multiplier: float
    eval_interval: int
    eval_samples: int
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
    beta: float
    kl_estimator: str
    epsilon_low: float
    epsilon_high: float
    loss_aggregation: str
    importance_sampling: str
    rollout_engine: str
    importance_sampling_correction: str  # truncated IS against the sampler: token, sequence or none
    importance_sampling_cap: float
    advantage_std: str
    max_completion_tokens: int
    temperature: float
    top_p: float
    eval_temperature: float  # 0: greedy validation
    warmup_steps: int
    max_grad_norm: float
    kl_limit: float
    reasoning_effort: str
    mask_truncated_completions: bool
    refill_rounds: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: Any
    gradient_checkpointing: bool = False
    n_devices: int = 1  # processes, one a device (`ranks.py`)
    sharded: bool = False  # FSDP2 over the ranks (full fine-tuning on several devices); else data parallel

    def echo(self) -> dict[str, Any]:
        """What the job object shows as its resolved hyperparameters."""
        return {k: v for k, v in asdict(self).items() if k != "sharded"}


def _pick(value: Any, default: Any) -> Any:
    return default if value == "auto" else value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def resolve(hp: dict[str, Any], n_train: int) -> RLConfig:
    compute = float(_pick(hp.get("compute_multiplier", "auto"), 1.0))
    group = samples_per_prompt(compute)
    batch = int(_pick(hp.get("batch_size", "auto"), min(8, n_train)))
    epochs = int(_pick(hp.get("n_epochs", "auto"), 3))
    steps_per_epoch = math.ceil(n_train / batch)
    total = epochs * steps_per_epoch
    multiplier = float(_pick(hp.get("learning_rate_multiplier", "auto"), 1.0))
    lora_rank = int(hp.get("lora_rank", 0))
    whole_groups = max(group, 16 // group * group)  # so each group's prompt is computed once per micro-batch
    return RLConfig(
        n_epochs=epochs,
        batch_size=batch,
        group_size=group,
        learning_rate=(LORA_LEARNING_RATE if lora_rank else BASE_LEARNING_RATE) * multiplier,
        learning_rate_multiplier=multiplier,
        compute_multiplier=compute,
        eval_interval=int(_pick(hp.get("eval_interval", "auto"), max(1, total // 5))),
        eval_samples=int(_pick(hp.get("eval_samples", "auto"), 1)),
        micro_batch_size=int(_pick(hp.get("micro_batch_size", "auto"), min(group * batch, whole_groups))),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        beta=float(hp.get("beta", 0.04)),
        kl_estimator=str(hp.get("kl_estimator", "k3")),
        epsilon_low=float(hp.get("epsilon_low", 0.2)),
        epsilon_high=float(hp.get("epsilon_high", 0.28)),
        loss_aggregation=str(hp.get("loss_aggregation", "token_mean")),
        importance_sampling=str(hp.get("importance_sampling", "token")),
        rollout_engine=str(hp.get("rollout_engine", "auto")),
        importance_sampling_correction=str(hp.get("importance_sampling_correction", "auto")),
        importance_sampling_cap=float(hp.get("importance_sampling_cap", 2.0)),
        advantage_std=str(hp.get("advantage_std", "group")),
        max_completion_tokens=int(hp.get("max_completion_tokens", 64)),
        temperature=float(hp.get("temperature", 1.0)),
        top_p=float(hp.get("top_p", 1.0)),
        eval_temperature=float(_or(hp.get("eval_temperature"), hp.get("temperature", 1.0))),
        warmup_steps=int(hp.get("warmup_steps", 0)),
        max_grad_norm=float(hp.get("max_grad_norm", 1.0)),
        kl_limit=float(hp.get("kl_limit", 0.5)),
        reasoning_effort=str(hp.get("reasoning_effort", "default")),
        mask_truncated_completions=bool(hp.get("mask_truncated_completions", True)),
        refill_rounds=int(hp.get("refill_rounds", 1)),
        lora_rank=lora_rank,
        lora_alpha=float(hp.get("lora_alpha") or 2 * lora_rank),
        lora_dropout=float(hp.get("lora_dropout", 0.0)),
        lora_target_modules=hp.get("lora_target_modules", "all-linear"),
        gradient_checkpointing=bool(_pick(hp.get("gradient_checkpointing", "auto"), False)),
    )


def with_devices(cfg: RLConfig, n_devices: int, sharded: bool) -> RLConfig:
    """`cfg` once the worker has resolved `n_devices` (`launch.devices_for`) and started its ranks."""
    return replace(cfg, n_devices=n_devices, sharded=sharded)


def with_engine(cfg: RLConfig, engine: str, same_as_trainer: bool) -> RLConfig:
    """`cfg` once the rollout engine is chosen: its name, and the correction its log-probs need."""
    correction = cfg.importance_sampling_correction
    if correction == "auto":
        correction = "none" if same_as_trainer else "token"
    return replace(cfg, rollout_engine=engine, importance_sampling_correction=correction)
