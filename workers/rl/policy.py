"""The trained policy and the reference it is kept near.

Full fine-tuning trains every weight and keeps a frozen copy as the reference. LoRA (peft) trains
low-rank adapters only; its reference is the same network with the adapters disabled, so no second
copy is loaded. With beta = 0 there is no reference at all.

Precision: the forward passes run under bf16 autocast where `RFT_TRAINING_PRECISION` says bf16, and
by default on CUDA (`autocast_dtype`). Trained weights and the optimizer stay fp32 there; a LoRA
job's frozen base, which no optimizer touches, is then held in bf16 itself: half the memory of the
largest tensors in the job, and the matmuls autocast would have run in bf16 anyway.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from service.core.settings import Settings
from service.models import thinking
from service.models.registry import load_fresh, resolve_for_project
from workers.rl.config import RLConfig
from workers.rl.loss import token_logprobs

EFFORT_PARAM = "method.reinforcement.hyperparameters.reasoning_effort"


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """bf16 where asked for, or by default on CUDA; None (fp32) on CPU unless asked for."""
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def build_policy(
    model_name: str, cfg: RLConfig, settings: Settings, device: str, *, seed: int, project_id: str | None = None
) -> tuple[Any, Any]:
    """The model to train: the base model, wrapped in fresh LoRA adapters when `cfg.lora_rank` > 0.

    The adapters' random A matrices are drawn right after seeding with `seed`, not from whatever state
    loading left the global RNG in: the first load of a GGUF model converts it and consumes random
    numbers, later loads read the cached copy and do not, and the same seed must give the same job.
    `cfg.gradient_checkpointing` keeps only each layer's input and replays the layer in the backward pass.
    A `ft:` model is one `project_id` owns or was granted, checked again here: a grant revoked since the
    job was created fails it."""
    frozen_base = autocast_dtype(settings.training_precision, torch.device(device).type) if cfg.lora_rank else None
    model, tokenizer = load_fresh(resolve_for_project(model_name, settings, project_id), settings, dtype=frozen_base)
    # Every rollout, evaluation and saved checkpoint renders with the switch the job asked for.
    tokenizer = thinking.pin(tokenizer, model_name, cfg.reasoning_effort, EFFORT_PARAM)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
            base_model_name_or_path=model_name,
        )
        torch.manual_seed(seed)
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # adapters in fp32 over a bf16 base
    return model.to(device).train(), tokenizer


def checkpoint_activations(model: Any) -> None:
    """Keep only each layer's input and replay the layer in the backward pass (through PEFT's
    wrappers too). Non-reentrant: frozen inputs (LoRA's) still get their layers' gradients."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def has_dropout(model: Any) -> bool:
    """Whether training mode changes the model's output: a dropout layer or a config dropout above 0."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    settings = getattr(getattr(model, "config", None), "__dict__", {})
    return any("dropout" in name and isinstance(value, float) and value > 0 for name, value in settings.items())


def reuses_prefix(model: Any, cfg: RLConfig) -> bool:
    """Whether the update may reuse sampling's prompt pass. Sampling runs in eval mode, the update in
    train mode: they are the same computation only where no dropout is active. Under gradient
    checkpointing the update replays its layers and takes no cache (`loss.token_logprobs`), so a
    kept prompt pass would only hold its graph in memory for nothing."""
    return not has_dropout(model) and not cfg.gradient_checkpointing


def trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Reference:
    def __init__(self, model: Any, cfg: RLConfig) -> None:
        self.model, self.lora = model, cfg.lora_rank > 0
        self.enabled = cfg.beta > 0
        self.copy = copy.deepcopy(model).eval().requires_grad_(False) if self.enabled and not self.lora else None

    @torch.no_grad()
    def logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, share_prompts: bool = True
    ) -> torch.Tensor:
        if self.lora:
            with self.model.disable_adapter():
                return token_logprobs(self.model, input_ids, attention_mask, prompt_len, share_prompts=share_prompts)[0]
        return token_logprobs(self.copy, input_ids, attention_mask, prompt_len, share_prompts=share_prompts)[0]
