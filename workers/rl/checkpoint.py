"""Checkpoints: a Hugging Face folder (safetensors weights, config, tokenizer) plus
`trainer_state.pt` with what an exact resume needs: optimizer, scheduler, RNG states, the step and
the evaluation history. The data order needs no cursor: it is a function of (seed, step).

A job on several devices writes the same folder: rank 0 writes it, and under FSDP2 the ranks first
gather the whole weights and moments to it (`torch.distributed.checkpoint.state_dict`). The moments
are stored as one process stores them (`optimizer.state_dict()`: keyed by the trained parameters'
order), so a checkpoint resumes on any number of devices."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.rl.launch import RankContext
from workers.rl.state import TrainerState

STATE_FILE = "trainer_state.pt"


def save(
    ctx: RankContext,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    metrics: dict[str, Any],
) -> str:
    weights, moments = _gathered(model, optimizer) if ctx.ranks.sharded else (None, optimizer.state_dict())

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True, **({"state_dict": weights} if weights else {}))
        tokenizer.save_pretrained(folder)
        adapter_config = folder / "adapter_config.json"
        if adapter_config.exists():  # name the base by our registry name, so the adapter loads anywhere here
            config = json.loads(adapter_config.read_text())
            config["base_model_name_or_path"] = ctx.job["model"]
            adapter_config.write_text(json.dumps(config, indent=2))
        torch.save(
            {
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "state": copy.deepcopy(state.to_dict()),
            },
            folder / STATE_FILE,
        )

    return ctx.save_checkpoint(step, write, metrics)


def restore(ctx: RankContext, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
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
        missing, unexpected = _load_weights(model, weights)
        if unexpected or any("lm_head" not in name for name in missing):
            raise RuntimeError(f"checkpoint {folder.name} does not match the model: {missing[:3]} {unexpected[:3]}")
    saved: dict[str, Any] = torch.load(folder / STATE_FILE, weights_only=False)
    if _is_sharded(model):
        _load_sharded_moments(model, optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved


def _is_sharded(model: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _trained_names(model: Any) -> list[str]:
    """The trained parameters' names, in the optimizer's order (`policy.trainable`)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _gathered(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An FSDP2 model's whole weights and moments, on rank 0 (empty elsewhere), the moments keyed as
    `optimizer.state_dict()` keys them. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, Any] = get_model_state_dict(model, options=whole)
    by_name: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=whole)
    if not weights:
        return {}, {}
    index = {name: i for i, name in enumerate(_trained_names(model))}
    return weights, {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def _load_weights(model: Any, weights: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Whole weights into `model`, sharding them where it is FSDP2's: (missing, unexpected) names."""
    if not _is_sharded(model):
        missing, unexpected = model.load_state_dict(weights, strict=False)
        return list(missing), list(unexpected)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)


def _load_sharded_moments(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Moments saved by index (`optimizer.state_dict()`), into an FSDP2 model's sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trained_names(model)
    by_name: dict[str, Any] = {
        "state": {names[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def prune(ctx: RankContext, evals: list[dict[str, Any]], latest_step: int, kl_limit: float, keep_best: int = 3) -> None:
    """Keep the latest checkpoint (for resume) and the best few eligible ones; delete the rest."""
    eligible = [e for e in evals if e.get("valid_kl") is None or e["valid_kl"] <= kl_limit]
    best = sorted(eligible, key=lambda e: (-e["valid_reward_mean"], e["step"]))[:keep_best]
    ctx.prune_checkpoints({latest_step} | {e["step"] for e in best})
