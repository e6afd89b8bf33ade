"""Score a downloaded model directory on valid.jsonl with plain transformers, next to the base model.

Nothing of rft is used here: the directory is loaded with `AutoModelForCausalLM.from_pretrained`,
answers are greedy, and the reward is the demo grader's own `grade()` (read from grader.json). That
shows the downloaded checkpoint is an ordinary Hugging Face model and what it gained.

    python examples/arithmetic/evaluate_download.py ./arithmetic-model --base ~/.rft/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_grade(path: Path) -> Callable[[dict[str, Any], dict[str, Any]], float]:
    namespace: dict[str, Any] = {}
    exec(json.loads(path.read_text())["source"], namespace)  # our own example grader, not user input
    grade: Callable[[dict[str, Any], dict[str, Any]], float] = namespace["grade"]
    return grade


def evaluate(folder: Path, rows: list[dict[str, Any]], grade: Callable[..., float], max_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = [grade({"output_text": a}, r) for a, r in zip(answers, rows, strict=True)]
    for answer, row, reward in list(zip(answers, rows, rewards, strict=True))[:3]:
        print(f"  {row['messages'][-1]['content']!r} -> {answer.strip()!r} ({reward:.0f})")
    return sum(rewards) / len(rewards)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="an unpacked download (rft checkpoints download --extract DIR)")
    p.add_argument("--base", type=Path, help="the base model directory, to compare against")
    p.add_argument("--valid", type=Path, default=HERE / "valid.jsonl")
    p.add_argument("--grader", type=Path, default=HERE / "grader.json")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.valid.read_text().splitlines() if line.strip()]
    grade = load_grade(args.grader)
    for name, folder in (("base", args.base), ("fine-tuned", args.model)):
        if folder is None:
            continue
        t0 = time.perf_counter()
        print(f"{name}: {folder}")
        reward = evaluate(folder, rows, grade, args.max_tokens)
        seconds = time.perf_counter() - t0
        print(f"{name}: greedy validation reward {reward:.3f} on {len(rows)} prompts ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
