"""Checkpoints: a Hugging Face folder (safetensors weights, config, tokenizer) plus
`trainer_state.pt` with what an exact resume needs: optimizer, scheduler, RNG states, the step and
the evaluation history. The data order needs no cursor: it is a function of (seed, step)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.context import JobContext
from workers.rl.state import TrainerState

STATE_FILE = "trainer_state.pt"


def save(
    ctx: JobContext,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    metrics: dict[str, Any],
) -> str:
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        adapter_config = folder / "adapter_config.json"
        if adapter_config.exists():  # name the base by our registry name, so the adapter loads anywhere here
            config = json.loads(adapter_config.read_text())
            config["base_model_name_or_path"] = ctx.job["model"]
            adapter_config.write_text(json.dumps(config, indent=2))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "state": copy.deepcopy(state.to_dict()),
            },
            folder / STATE_FILE,
        )

    return ctx.save_checkpoint(step, write, metrics)


def restore(ctx: JobContext, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """Load the latest checkpoint into the given objects; the trainer state to continue from."""
    latest = ctx.latest_checkpoint()
    if latest is None:
        return TrainerState()
    step, folder = latest
    saved = load_into(folder, model, optimizer, scheduler)
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    state = TrainerState.from_dict(saved["state"])
    state.step, state.resumed_at = step, step
    ctx.event(f"Resumed from the checkpoint at step {step}.", dedupe_key=f"resume:{step}:{len(state.evals)}")
    return state


def load_into(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Weights, optimizer and scheduler from a checkpoint folder; the saved trainer state dict."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():  # LoRA: only the adapters were trained and saved
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter), device=str(model.device)))
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise RuntimeError(f"adapter {folder.name} does not match the model: {unexpected[:3]}")
    else:
        weights = load_file(str(folder / "model.safetensors"), device=str(model.device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any("lm_head" not in name for name in missing):
            raise RuntimeError(f"checkpoint {folder.name} does not match the model: {missing[:3]} {unexpected[:3]}")
    saved: dict[str, Any] = torch.load(folder / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved


def prune(ctx: JobContext, evals: list[dict[str, Any]], latest_step: int, kl_limit: float, keep_best: int = 3) -> None:
    """Keep the latest checkpoint (for resume) and the best few eligible ones; delete the rest."""
    eligible = [e for e in evals if e.get("valid_kl") is None or e["valid_kl"] <= kl_limit]
    best = sorted(eligible, key=lambda e: (-e["valid_reward_mean"], e["step"]))[:keep_best]
    ctx.prune_checkpoints({latest_step} | {e["step"] for e in best})
