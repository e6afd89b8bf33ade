"""A fast stand-in trainer that writes what the RL loop writes, for the dashboard's browser tests.

Set `RFT_TRAINER=tests.support.dashboard_trainer:scripted`. It loads no model: each step sleeps a
moment and records metrics shaped like `workers/rl/loop.py`'s (rewards, KL, entropy, completion
length, per-grader scores, error rates, timings), a baseline event, evaluations whose completions
are really graded by the job's grader, checkpoints, and the final-model choice event of
`workers/rl/selection.py`. It honours cancel and pause after each step, as a real trainer must.
Per-job knobs come from the job's metadata: `steps`, `step_seconds`, `eval_interval`.

One addition to the loop's shape: each evaluation sample also carries `scores` (per-grader
scores), which the rollout browser shows where present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from service.graders.engine import compile_grader, grade_batch, grader_types
from service.graders.schemas import parse_grader
from service.graders.templates import Sample
from workers.context import JobContext, TrainingResult
from workers.rl.config import resolve
from workers.rl.selection import finish
from workers.rl.state import TrainerState

KL_LIMIT = 0.5


def _examples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _completion(item: dict[str, Any], progress: float, rng: random.Random) -> str:
    """Wrong and wordy at first, right and terse later, with some reward hacking (the answer repeated)."""
    answer = str(item.get("answer", "42"))
    roll = rng.random()
    if roll > 0.35 + 0.6 * progress:
        return f"Let me think. The sum is {int(answer) + rng.randint(1, 3) if answer.isdigit() else '?'}."
    if progress > 0.6 and roll < 0.15:
        return f"{answer} {answer} {answer}"
    return answer


class _Evaluator:
    def __init__(self, ctx: JobContext, grader: Any) -> None:
        path = ctx.job.get("validation_path") or ctx.job["training_path"]
        self.valid = _examples(Path(path))
        self.grader, self.seed = grader, int(ctx.job["seed"])

    def run(self, step: int, total: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:eval:{step}")
        texts = [_completion(e, step / total, rng) for e in self.valid]
        batch = grade_batch(self.grader, [Sample.from_text(t) for t in texts], self.valid)
        samples = [
            {
                "prompt": e["messages"][-1]["content"],
                "completion": text,
                "reward": grade.reward,
                "errors": sorted(grade.errors),
                "scores": grade.scores,
            }
            for e, text, grade in zip(self.valid, texts, batch.grades, strict=True)
        ][:5]
        kl = 0.0 if step == 0 else 0.02 * step / total * (1 + rng.random())
        reward = sum(batch.rewards) / len(batch.rewards)
        return {"step": step, "reward": reward, "kl": kl, "graders": batch.grader_means(), "samples": samples}


def _train_metrics(step: int, total: int, grader_types: dict[str, str], rng: random.Random) -> dict[str, Any]:
    progress = step / total
    reward = min(1.0, max(0.0, 0.25 + 0.6 * progress + rng.uniform(-0.08, 0.08)))
    sampling, training = 0.8 + rng.uniform(0, 0.3), 1.6 + rng.uniform(0, 0.4)
    graders = [
        {"name": n, "type": t, "train_reward_mean": min(1.0, max(0.0, reward + rng.uniform(-0.15, 0.15)))}
        for n, t in grader_types.items()
    ]
    return {
        "step": step,
        "total_steps": total,
        "train_reward_mean": reward,
        "completion_tokens_mean": 24 * math.exp(-2 * progress) + 3 + rng.uniform(0, 1),
        "frac_zero_std_groups": rng.choice([0.0, 0.25]),
        "scores": {"graders": graders},
        "python_grader_runtime_error_mean": 0.0,
        "loss": rng.uniform(-0.05, 0.05),
        "kl": 0.03 * progress + rng.uniform(0, 0.004),
        "entropy": 1.9 - 1.1 * progress + rng.uniform(-0.05, 0.05),
        "clip_fraction": rng.uniform(0, 0.05),
        "grad_norm": rng.uniform(0.2, 0.9),
        "lr": 1e-5,
        "update_skipped": False,
        "tokens_per_second": 90 + rng.uniform(-10, 10),
        "timing": {
            "step": {
                "sampling": sampling,
                "scoring": 0.004,
                "training": training,
                "eval": 0.0,
                "full_iteration": sampling + training,
            }
        },
    }


def _write_state(step: int) -> Any:
    def write(folder: Path) -> None:
        (folder / "state.json").write_text(json.dumps({"step": step}))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "dashboard test"}))

    return write


def scripted(ctx: JobContext) -> TrainingResult:
    job = ctx.job
    knobs = job.get("metadata_") or {}
    total, delay = int(knobs.get("steps", 12)), float(knobs.get("step_seconds", 0.15))
    every = int(knobs.get("eval_interval", 3))
    latest = ctx.latest_checkpoint()
    start = json.loads((latest[1] / "state.json").read_text())["step"] if latest else 0
    config = parse_grader(job["method"]["reinforcement"]["grader"])
    _echo_resolved(ctx, every)
    with compile_grader(config, ctx.settings, job["project_id"]) as grader:
        types, evaluator = grader_types(grader), _Evaluator(ctx, grader)
        baseline = evaluator.run(0, total)
        ctx.event(
            f"Baseline validation reward of the untouched model: {baseline['reward']:.4f}",
            data=baseline,
            dedupe_key="baseline",
        )
        evals: list[dict[str, Any]] = []
        for step in range(start + 1, total + 1):
            time.sleep(delay)
            metrics = _train_metrics(step, total, types, random.Random(f"{job['seed']}:{step}"))
            if step % every == 0 or step == total:
                evals.append(_evaluate(ctx, evaluator, metrics))
            ctx.metrics(step, metrics)
            ctx.update_job(estimated_finish=int(time.time() + delay * (total - step)))
            request = ctx.control()
            if request == "cancel":
                return TrainingResult("cancelled")
            if request == "pause":
                ctx.save_checkpoint(step, _write_state(step), {"train_reward_mean": metrics["train_reward_mean"]})
                return TrainingResult("paused")
    return _finish(ctx, evals, baseline["reward"], total)


def _echo_resolved(ctx: JobContext, eval_interval: int) -> None:
    """Replace "auto" hyperparameters by their values, as the RL loop does at start."""
    reinforcement = ctx.job["method"]["reinforcement"]
    hp = reinforcement["hyperparameters"]
    resolved = {**resolve(hp, len(_examples(Path(ctx.job["training_path"])))).echo(), "eval_interval": eval_interval}
    echoed = {**hp, **{k: v for k, v in resolved.items() if k in hp}}
    ctx.update_job(method={**ctx.job["method"], "reinforcement": {**reinforcement, "hyperparameters": echoed}})


def _evaluate(ctx: JobContext, evaluator: _Evaluator, metrics: dict[str, Any]) -> dict[str, Any]:
    """Add the evaluation to this step's metrics, write its checkpoint; the entry selection reads."""
    step = metrics["step"]
    result = evaluator.run(step, metrics["total_steps"])
    metrics.update(valid_reward_mean=result["reward"], valid_kl=result["kl"], valid_samples=result["samples"])
    metrics["timing"]["step"]["eval"] = 0.5
    for entry in metrics["scores"]["graders"]:  # OpenAI's per-grader validation figure
        entry["valid_reward_mean"] = result["graders"][entry["name"]]
    kept = {k: metrics[k] for k in ("train_reward_mean", "valid_reward_mean", "valid_kl", "kl", "entropy")}
    ctx.save_checkpoint(step, _write_state(step), kept)
    return {"step": step, "valid_reward_mean": result["reward"], "valid_kl": result["kl"]}


def _finish(ctx: JobContext, evals: list[dict[str, Any]], baseline: float, total: int) -> TrainingResult:
    """The RL loop's own final-model selection and its event."""
    cfg = SimpleNamespace(kl_limit=KL_LIMIT)
    result = finish(ctx, TrainerState(evals=evals, baseline={"reward": baseline}), cfg)  # type: ignore[arg-type]
    return dataclasses.replace(result, trained_tokens=total * 512)
