"""Examples from a validated RFT JSONL file, and the deterministic order they are visited in."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.rl.state import derive_seed


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]
    item: dict[str, Any]  # the whole line: graders read {{item.*}}


def load_examples(path: Path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                examples.append(Example(obj["messages"], obj))
    return examples


def batch_for_step(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indexes of the prompts of 0-based `step`: each epoch is a fresh shuffle seeded by (seed, epoch),
    so the data order is a function of the step alone and resumes need no cursor."""
    steps_per_epoch = -(-n // batch_size)
    epoch, index = divmod(step, steps_per_epoch)
    order = list(range(n))
    random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]
