"""Same completions in, same model out? Our loop against TRL's GRPOTrainer on identical rollouts.

    python bench/trl_replay.py [--mode lora|full] [--steps 10] [--seed 42] [--json-out r.json]
    python bench/trl_replay.py --smoke      # tiny random Llama, 2 steps, seconds

`trl_compare.py` runs both frameworks side by side, but each samples its own completions, so the two
runs part ways at step 1 and their final validation rewards differ by the luck of the draw as well as
by anything the two trainers do differently. This script takes the luck out. It runs our loop for N
steps and records every completion it sampled. It then runs TRL's `GRPOTrainer`, with the same settings
(`trl_compare.py`'s), starting from our initial trainable weights (the same LoRA A matrices), with its
generation replaced by a replay of our completions for the same prompts. Everything after sampling is
TRL's own: grading through its reward function, advantages, reference and policy passes, loss,
clipping, AdamW.

A control run sets the scale: our loop again, with micro-batches of half the size (the same gradient,
summed in another order, so the runs differ by float rounding alone), on its own sampled completions,
which are compared with the first run's: the control holds only where rounding flipped no token.

If the two trainers do the same thing, every step's train reward is the same (the same completions),
the KL and gradient norm agree to float rounding, and the final weights agree: the report gives, per
step, both frameworks' reward, KL and pre-clip gradient norm, and at the end the distance between the
two final models relative to how far training moved them (and the control's distance, on the same
scale), and each model's greedy validation reward.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from trl_compare import (
    SMOKE,
    Bench,
    build_ours,
    code_version,
    completion_ids,
    evaluate,
    trl_logs,
    trl_trainer,
    validation,
)

import workers.rl.engine as engine_module
from workers.rl.rollout import Rollout, sample

Completions = dict[tuple[int, ...], deque[list[int]]]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, copied (LoRA: the adapters; full: every weight)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(model: torch.nn.Module) -> dict[str, float]:
    """Every parameter's sum, by name: the frozen base must be the same network on both sides too."""
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def recording(sample: Callable[..., Rollout], into: Completions) -> Callable[..., Rollout]:
    """Wrap the torch engine's `sample`: each training completion (through EOS) is queued under its prompt's tokens."""

    def recorded(*args: Any, **kwargs: Any) -> Rollout:
        rollout = sample(*args, **kwargs)
        p = rollout.prompt_len
        for row, completion in enumerate(completion_ids(rollout)):
            prompt = rollout.input_ids[row, :p][rollout.attention_mask[row, :p].bool()]
            into[tuple(prompt.tolist())].append(completion)
        return rollout

    return recorded


def run_ours(bench: Bench, lora: bool) -> dict[str, Any]:
    ours = build_ours(bench, lora)
    completions: Completions = defaultdict(deque)
    initial, base = trainable_state(ours.model), fingerprint(ours.model)
    engine_module.sample = recording(sample, completions)  # what TorchEngine samples with
    steps = []
    with ours.grader as grader:
        for step in range(1, bench.steps + 1):
            m = ours.loop.train_step(step)
            steps.append({"reward": m["train_reward_mean"], "kl": m["kl"], "grad_norm": m["grad_norm"]})
            print(f"  ours step {step}: {json.dumps(steps[-1])}", flush=True)
            if m["update_skipped"]:
                raise SystemExit(f"our loop skipped the update of step {step}; the runs cannot be compared")
        after = evaluate(ours.model, ours.tokenizer, ours.valid, grader, ours.cfg.max_completion_tokens)
    return {
        "micro_batch_size": ours.cfg.micro_batch_size,
        "initial": initial,
        "base": base,
        "final": trainable_state(ours.model),
        "completions": completions,
        "steps": steps,
        "valid_after": after,
    }


def replay(completions: Completions) -> Callable[..., tuple[list[list[int]], None]]:
    """A stand-in for `GRPOTrainer._generate_single_turn`: our completions for these prompts, in our order."""

    def generate(prompt_ids: list[list[int]], *_: Any, **__: Any) -> tuple[list[list[int]], None]:
        out = []
        for i, prompt in enumerate(prompt_ids):
            queue = completions.get(tuple(prompt))
            if not queue:
                raise SystemExit(f"TRL asked for prompt row {i} whose tokens our loop never sampled (or ran out)")
            out.append(queue.popleft())
        return out, None

    return generate


def run_trl(bench: Bench, lora: bool, ours: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        trainer, cfg, tokenizer, compiled = trl_trainer(bench, lora, out, [])
        params = dict(trainer.model.named_parameters())
        names = {n for n, p in params.items() if p.requires_grad}
        if names != set(ours["initial"]):
            raise SystemExit(
                f"trainable parameters differ: ours only {sorted(set(ours['initial']) - names)[:3]}, "
                f"TRL only {sorted(names - set(ours['initial']))[:3]}"
            )
        with torch.no_grad():
            for name, value in ours["initial"].items():
                params[name].copy_(value)
        if fingerprint(trainer.model) != ours["base"]:
            raise SystemExit("the two frameworks start from different weights")
        trainer._generate_single_turn = replay(ours["completions"])
        with compiled as grader:
            trainer.train()
            after = evaluate(trainer.model, tokenizer, validation(bench), grader, cfg.max_completion_tokens)
    steps = [{"reward": e["reward"], "kl": e.get("kl"), "grad_norm": e.get("grad_norm")} for e in trl_logs(trainer)]
    left = sum(len(q) for q in ours["completions"].values())
    if left:
        raise SystemExit(f"TRL used fewer completions than our loop sampled: {left} left over")
    return {"final": trainable_state(trainer.model), "steps": steps, "valid_after": after}


def control(bench: Bench, lora: bool, ours: dict[str, Any]) -> dict[str, Any]:
    """Our loop again with micro-batches of 8, not 16: the same gradient, summed in another order. How far
    apart two runs end that differ only in float rounding is the yardstick for the distance to TRL. Valid
    only while rounding flips no sampled token, so the completions are compared too."""
    again = run_ours(replace(bench, micro_batch_size=max(1, ours["micro_batch_size"] // 2)), lora)
    same = {k: list(v) for k, v in again["completions"].items()} == {k: list(v) for k, v in ours["completions"].items()}
    return {**again, "same_completions": same}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a))


def compare(mode: str, ours: dict[str, Any], trl: dict[str, Any], again: dict[str, Any] | None) -> dict[str, Any]:
    moved = distance(ours["final"], ours["initial"])
    apart = distance(ours["final"], trl["final"])
    rows = []
    for step, (o, t) in enumerate(zip(ours["steps"], trl["steps"], strict=True), start=1):
        rows.append({"step": step, "ours": o, "trl": t})
    result = {
        "mode": mode,
        "steps": rows,
        "ours_moved": moved,
        "trl_moved": distance(trl["final"], ours["initial"]),
        "apart": apart,
        "apart_relative": apart / moved if moved else float("nan"),
        "valid_after": {"ours": ours["valid_after"], "trl": trl["valid_after"]},
    }
    if again is not None:
        control = distance(ours["final"], again["final"])
        result["control"] = {
            "micro_batch_size": [ours["micro_batch_size"], again["micro_batch_size"]],
            "same_completions": again["same_completions"],
            "apart": control,
            "apart_relative": control / moved if moved else float("nan"),
            "valid_after": again["valid_after"],
            "steps": again["steps"],
        }
    return result


def report(result: dict[str, Any]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| step | train reward ours | TRL | KL ours | TRL | grad norm ours | TRL |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["steps"]:
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {r['step']} | {o['reward']:.4f} | {t['reward']:.4f} | {num(o['kl'], '.3e')} | {num(t['kl'], '.3e')} "
            f"| {num(o['grad_norm'], '.4f')} | {num(t['grad_norm'], '.4f')} |"
        )
    v = result["valid_after"]
    lines += [
        "",
        f"{result['mode']}: trainable weights moved {result['ours_moved']:.4g} (ours) and {result['trl_moved']:.4g} "
        f"(TRL); the two final models are {result['apart']:.4g} apart, {100 * result['apart_relative']:.2f}% of "
        f"the distance moved",
        f"{result['mode']}: greedy validation reward after: ours {v['ours']:.3f}, TRL {v['trl']:.3f}",
    ]
    c = result.get("control")
    if c is not None:
        a, b = c["micro_batch_size"]
        lines.append(
            f"{result['mode']}: control, ours with micro-batches of {b} instead of {a}: "
            f"{'the same' if c['same_completions'] else 'DIFFERENT (control not valid)'} completions, final model "
            f"{c['apart']:.4g} from ours ({100 * c['apart_relative']:.2f}% of the distance moved), greedy "
            f"validation reward {c['valid_after']:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Our loop and TRL's GRPOTrainer trained on the same completions.")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, help=f"training steps (default {Bench.steps})")
    p.add_argument("--seed", type=int, help=f"seed of data order, sampling and LoRA init (default {Bench.seed})")
    p.add_argument("--beta", type=float, help=f"KL coefficient (default {Bench.beta}; 0 leaves the KL term out)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 steps, small batches: seconds")
    p.add_argument("--json-out", type=Path, help="also write the comparison here")
    p.add_argument(
        "--no-control", action="store_true", help="skip the control run (ours again with half the micro-batch)"
    )
    args = p.parse_args()
    bench = SMOKE if args.smoke else Bench()
    bench = replace(
        bench, **{k: v for k, v in {"steps": args.steps, "seed": args.seed, "beta": args.beta}.items() if v is not None}
    )
    lora = args.mode == "lora"
    print(f"rft {code_version()}: {args.mode}, {bench.steps} steps, seed {bench.seed}", flush=True)
    ours = run_ours(bench, lora)
    again = None if args.no_control else control(bench, lora, ours)  # before TRL, which uses up the completions
    trl = run_trl(bench, lora, ours)
    result = compare(args.mode, ours, trl, again)
    print(report(result), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"rft": code_version(), "bench": bench.__dict__, **result}, indent=2))


if __name__ == "__main__":
    main()
