"""What constrained decoding (llguidance token masks, `service/models/guided.py`) costs per token.

Two measurements, each repeated and the median kept:

1. The mask alone: a `Guide` over SmolLM2's 49,152-token vocabulary follows rows that replay a
   valid answer of the schema token by token; per step it computes every row's mask, applies it to
   a (rows, V) logits tensor and feeds each row its token. Per step and per row-token.
2. End to end: the torch rollout engine samples the same prompts with and without the constraint,
   greedy (so both runs decode the same number of tokens where both stop at the same point is not
   needed: time is divided by the tokens each run decoded).

    python bench/constrained_decoding.py [--rows 1 8 32] [--repeats 5] [--model MODEL] [--mask-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from service.core.settings import Settings
from service.models import registry
from service.models.constraints import from_response_format
from service.models.guided import Guide
from service.models.templates import eos_ids
from workers.rl.rollout import sample

ROOT = Path(__file__).resolve().parent.parent
FORMAT = json.loads((ROOT / "examples" / "tool_calling" / "response_format.json").read_text())
ANSWER = '{"name": "convert_currency", "arguments": {"amount": 209, "source": "JPY", "target": "USD"}}'


def mask_cost(tokenizer: Any, vocab: int, ends: list[int], rows: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one step (mask, apply, advance) for `rows` rows, and the steps per answer."""
    constraint = from_response_format(FORMAT, "response_format")
    assert constraint is not None
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    runs = []
    for _ in range(repeats):
        guide = Guide(constraint, tokenizer, rows, vocab, ends)
        logits = torch.zeros((rows, vocab))
        began = time.perf_counter()
        for token in answer:
            guide.mask_(logits)
            guide.advance([token] * rows)
        runs.append((time.perf_counter() - began) / len(answer))
        assert not any(m.is_error() for m in guide.matchers)
    return statistics.median(runs), len(answer)


def rollout_cost(model: Any, tokenizer: Any, prompts: int, repeats: int, constrained: bool) -> float:
    """Median seconds per decoded token (all rows together) of a greedy rollout of `prompts` prompts."""
    constraint = from_response_format(FORMAT, "response_format") if constrained else None
    conversations = [[{"role": "user", "content": f"Convert {20 + i} JPY to USD."}] for i in range(prompts)]
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        rollout = sample(
            model, tokenizer, conversations, 1, max_new_tokens=32, temperature=1.0, top_p=1.0, seed=0,
            greedy=True, constraint=constraint,
        )  # fmt: skip
        runs.append((time.perf_counter() - began) / max(rollout.completion_mask.shape[1], 1))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=registry.SMOLLM2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mask-only", action="store_true", help="skip the end-to-end rollouts")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = registry.load_fresh(registry.resolve(args.model), Settings())
    model.eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ends = eos_ids(model, tokenizer)
    print(f"model {args.model}: vocabulary {vocab}, torch threads {torch.get_num_threads()}")
    for rows in args.rows:
        step, steps = mask_cost(tokenizer, vocab, ends, rows, args.repeats)
        print(
            f"mask  rows={rows:3d}: {step * 1e3:7.3f} ms a step, "
            f"{step / rows * 1e6:8.1f} us a row-token ({steps} steps)"
        )
    for rows in [] if args.mask_only else args.rows:
        plain = rollout_cost(model, tokenizer, rows, args.repeats, constrained=False)
        held = rollout_cost(model, tokenizer, rows, args.repeats, constrained=True)
        print(
            f"decode rows={rows:3d}: {plain * 1e3:7.2f} ms a step plain, {held * 1e3:7.2f} ms constrained "
            f"(+{(held - plain) * 1e3:.2f} ms, {100 * (held / plain - 1):+.0f}%)"
        )


if __name__ == "__main__":
    main()
