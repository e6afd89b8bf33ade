"""Stability guards and warnings.

An update is refused when the loss or gradient norm is not finite, or when the gradient norm spikes
above `SPIKE_FACTOR` x the median of the last accepted ones. A refused update rolls the model back to
the last checkpoint (the base weights before the first one) and halves the learning rate; after
`MAX_ROLLBACKS` the job fails with `training_unstable`. Drifts that do not break training raise
`warn` events: KL above `kl_limit`, entropy collapsing below a tenth of its first value, and a
train-minus-validation reward gap that widens over three evaluations (reward hacking).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from service.core.errors import ApiError
from workers.rl.state import GuardState

SPIKE_FACTOR = 10.0
SPIKE_WARMUP = 5
MAX_ROLLBACKS = 3
HISTORY = 20


class TrainingUnstable(ApiError):
    status_code = 500
    type = "server_error"
    code = "training_unstable"


def refusal(guard: GuardState, loss: float, grad_norm: float, clip: float) -> str | None:
    """Why this update must not be applied, or None (and then the norm joins the history).

    A spike is measured against the recent median but never against less than the clipping norm:
    once a task is mostly solved, steps carry only the KL term and tiny norms, and an ordinary
    update must not look like a spike next to them."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        return f"non-finite loss or gradient (loss {loss}, gradient norm {grad_norm})"
    norms = guard.grad_norms
    if len(norms) >= SPIKE_WARMUP:
        typical = max(statistics.median(norms), clip)
        if grad_norm > SPIKE_FACTOR * max(typical, 1e-8):
            return (
                f"gradient norm spike ({grad_norm:.3g}, {grad_norm / max(typical, 1e-8):.0f}x the median {typical:.3g})"
            )
    guard.grad_norms = (norms + [grad_norm])[-HISTORY:]
    return None


def count_rollback(guard: GuardState, reason: str, step: int) -> None:
    guard.rollbacks += 1
    guard.lr_scale *= 0.5
    if guard.rollbacks > MAX_ROLLBACKS:
        raise TrainingUnstable(
            f"Training is unstable: step {step} had a {reason} after {MAX_ROLLBACKS} rollbacks with the learning "
            "rate halved each time. Lower learning_rate_multiplier or max_grad_norm, or raise beta."
        )


def warnings(
    guard: GuardState, metrics: dict[str, Any], evals: list[dict[str, Any]], kl_limit: float
) -> list[tuple[str, str]]:
    """(dedupe key, message) for each drift worth a `warn` event after this step."""
    step, out = metrics["step"], []
    kl = metrics.get("valid_kl") if metrics.get("valid_kl") is not None else metrics.get("kl")
    if kl is not None and kl > kl_limit:
        out.append(
            (
                f"kl-runaway:{step}",
                f"Step {step}: KL from the initial policy is {kl:.4f}, above kl_limit "
                f"{kl_limit}; checkpoints past it are not eligible as the final model.",
            )
        )
    entropy = metrics.get("entropy")
    if entropy and guard.entropy0 is None:
        guard.entropy0 = entropy
    if entropy is not None and guard.entropy0 and entropy < 0.1 * guard.entropy0:
        out.append(
            (
                "entropy-collapse",
                f"Step {step}: policy entropy fell to {entropy:.4f} from "
                f"{guard.entropy0:.4f}; the model has stopped exploring.",
            )
        )
    gaps = [e["train_reward_mean"] - e["valid_reward_mean"] for e in evals[-3:] if "valid_reward_mean" in e]
    if len(gaps) == 3 and gaps[0] < gaps[1] < gaps[2] and gaps[2] > 0.2:
        out.append(
            (
                f"reward-gap:{step}",
                f"Step {step}: train reward exceeds validation reward by {gaps[2]:.3f} and "
                "the gap has widened over three evaluations: possible reward hacking; "
                "read the sampled completions.",
            )
        )
    return out
