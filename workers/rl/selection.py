"""Choosing the final model by evidence: the evaluated checkpoint with the best validation reward
among those whose KL from the initial policy is under `kl_limit` (unmeasured KL, with beta = 0,
does not exclude a checkpoint). Ties go to the earlier step. The choice is explained in an event."""

from __future__ import annotations

from typing import Any

from service.jobs import repository
from service.jobs.service import fine_tuned_model_name
from workers.context import JobContext, TrainingResult
from workers.retry import in_transaction
from workers.rl.config import RLConfig
from workers.rl.state import TrainerState


def choose(evals: list[dict[str, Any]], kl_limit: float) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the chosen evaluation, the ones excluded for KL)."""
    within = [e for e in evals if e.get("valid_kl") is None or e["valid_kl"] <= kl_limit]
    excluded = [e for e in evals if e not in within]
    if not within:
        return None, excluded
    return max(within, key=lambda e: (e["valid_reward_mean"], -e["step"])), excluded


def finish(ctx: JobContext, state: TrainerState, cfg: RLConfig) -> TrainingResult:
    evals = state.evals
    assert state.baseline is not None  # evaluated before step 1
    baseline = state.baseline["reward"]
    chosen, excluded = choose(evals, cfg.kl_limit)
    if chosen is None:  # every checkpoint drifted too far: keep the one closest to the initial policy
        chosen = min(evals, key=lambda e: e["valid_kl"])
    last = evals[-1]
    beat = chosen["valid_reward_mean"] > baseline
    kl = "unmeasured (beta=0)" if chosen.get("valid_kl") is None else f"{chosen['valid_kl']:.4f}"
    message = (
        f"Final model: the checkpoint at step {chosen['step']} (validation reward "
        f"{chosen['valid_reward_mean']:.4f}, KL {kl}); baseline {baseline:.4f}, last step {last['step']} "
        f"{last['valid_reward_mean']:.4f}; {len(excluded)} checkpoint(s) excluded for KL > {cfg.kl_limit}."
    )
    if not beat:
        message += " No checkpoint beat the baseline: the fine-tuned model is not better than the base model."
    job = in_transaction(ctx.settings, lambda session: repository.get_unscoped(session, ctx.job_id))
    assert job is not None
    name = f"{fine_tuned_model_name(job)}:ckpt-step-{chosen['step']}"
    selection = {
        "chosen_step": chosen["step"],
        "baseline_valid_reward": baseline,
        "beat_baseline": beat,
        "chosen": chosen,
        "last": last,
        "excluded_for_kl": [e["step"] for e in excluded],
    }
    ctx.event(message, level="info" if beat else "warn", data=selection, dedupe_key="final-selection")
    ctx.tracking.summary({**selection, "fine_tuned_model": name})
    return TrainingResult("succeeded", fine_tuned_model=name, message="The job has successfully completed.")
