"""Do our sampler and TRL's draw from the same distribution? Many completions of the untouched model from each.

    python bench/sampler_check.py [--samples 8] [--seed 42] [--json-out r.json]
    python bench/sampler_check.py --smoke      # tiny random Llama, seconds

`trl_replay.py` shows that the two trainers, given the same completions, end at the same model. What is
left between the two frameworks in `trl_compare.py` is sampling: ours runs its own decode loop
(`workers.rl.rollout.sample`), TRL calls `generate` through `GRPOTrainer._generate_single_turn`. Both
should draw from the model's distribution at the training temperature. This script asks each for
`--samples` completions of every training and validation prompt of the arithmetic example (same model,
temperature, top_p and length as the bench), grades them with the bench's grader and compares the mean
reward, the share of completions that end with EOS, and the mean length. Standard errors are taken over
prompts (the completions of one prompt are not independent), and the difference is paired by prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from seeds_summary import mean_and_se
from trl_compare import EXAMPLE, SMOKE, Bench, code_version, completion_ids, trl_trainer

from service.graders.engine import Compiled, grade_batch
from service.graders.templates import Sample
from workers.rl.data import Example, load_examples
from workers.rl.rollout import sample

CHUNK = 8  # prompts per call, as in a training step


def per_prompt(
    grader: Compiled, examples: list[Example], completions: list[list[int]], eos: int, tokenizer: Any, k: int
) -> dict[str, list[float]]:
    """Mean reward, EOS share and length of each prompt's k completions (laid out prompt by prompt)."""
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    items = [e.item for e in examples for _ in range(k)]
    rewards = grade_batch(grader, [Sample.from_text(t) for t in texts], items).rewards
    out: dict[str, list[float]] = {"reward": [], "eos": [], "length": []}
    for p in range(len(examples)):
        rows = range(p * k, (p + 1) * k)
        out["reward"].append(sum(rewards[r] for r in rows) / k)
        out["eos"].append(sum(1.0 for r in rows if completions[r] and completions[r][-1] == eos) / k)
        out["length"].append(sum(len(completions[r]) for r in rows) / k)
    return out


def ours(model: Any, tokenizer: Any, examples: list[Example], bench: Bench, k: int) -> list[list[int]]:
    completions: list[list[int]] = []
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        rollout = sample(
            model,
            tokenizer,
            [e.messages for e in chunk],
            k,
            max_new_tokens=bench.max_completion_tokens,
            temperature=bench.temperature,
            top_p=1.0,
            seed=bench.seed + start,
        )
        completions += completion_ids(rollout)
    return completions


def trl(trainer: Any, examples: list[Example], bench: Bench, k: int) -> list[list[int]]:
    torch.manual_seed(bench.seed)
    completions: list[list[int]] = []
    for start in range(0, len(examples), CHUNK):
        prompts = [e.messages for e in examples[start : start + CHUNK] for _ in range(k)]
        prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
        ids, _ = trainer._generate_single_turn(prompt_ids, images, fields, k)
        completions += ids
    return completions


def main() -> None:
    p = argparse.ArgumentParser(description="Our sampler against TRL's on the untouched model.")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--seed", type=int, help=f"sampling seed (default {Bench.seed})")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama: seconds")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    bench = SMOKE if args.smoke else Bench()
    bench = replace(bench, seed=args.seed if args.seed is not None else bench.seed)
    k = args.samples
    examples = load_examples(EXAMPLE / "train.jsonl") + load_examples(EXAMPLE / "valid.jsonl")
    if args.smoke:
        examples = examples[:CHUNK]
    with tempfile.TemporaryDirectory() as out:
        trainer, _, tokenizer, compiled = trl_trainer(bench, False, out, [])
        model, eos = trainer.model.eval(), int(tokenizer.eos_token_id)
        with compiled as grader:
            results = {
                "ours": per_prompt(grader, examples, ours(model, tokenizer, examples, bench, k), eos, tokenizer, k),
                "trl": per_prompt(grader, examples, trl(trainer, examples, bench, k), eos, tokenizer, k),
            }
    print(f"rft {code_version()}: {len(examples)} prompts x {k} completions each, T={bench.temperature}")
    print("| measure | ours | TRL | ours - TRL (paired by prompt) |")
    print("| --- | ---: | ---: | ---: |")
    summary: dict[str, Any] = {}
    for key in ("reward", "eos", "length"):
        o, t = mean_and_se(results["ours"][key]), mean_and_se(results["trl"][key])
        d = mean_and_se([a - b for a, b in zip(results["ours"][key], results["trl"][key], strict=True)])
        summary[key] = {"ours": o, "trl": t, "difference": d}
        print(f"| {key} | {o[0]:.3f} ± {o[1]:.3f} | {t[0]:.3f} ± {t[1]:.3f} | {d[0]:+.3f} ± {d[1]:.3f} |")
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"rft": code_version(), "prompts": len(examples), "samples": k, **summary}, indent=2)
        )


if __name__ == "__main__":
    main()
