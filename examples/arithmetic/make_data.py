"""Write train.jsonl and valid.jsonl for the arithmetic RFT demo (deterministic, seeded).

Each line is a chat prompt asking for a small sum plus the `answer` the grader checks:

    {"messages": [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}], "answer": "12"}

The (a, b) pairs come from 1..12 x 1..12 (144 ordered pairs), shuffled with a fixed seed and split
so that no pair appears in both files.

    python examples/arithmetic/make_data.py [--out DIR] [--train N] [--valid N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPT = "What is {a} + {b}? Answer with just the number."
LOW, HIGH = 1, 12


def line(a: int, b: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": PROMPT.format(a=a, b=b)}], "answer": str(a + b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--valid", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    if args.train + args.valid > len(pairs):
        parser.error(f"--train + --valid must be at most {len(pairs)} (distinct pairs)")
    random.Random(args.seed).shuffle(pairs)
    valid, train = pairs[: args.valid], pairs[args.valid : args.valid + args.train]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("valid.jsonl", valid)):
        path = args.out / name
        with open(path, "w", encoding="utf-8") as f:
            for a, b in rows:
                f.write(json.dumps(line(a, b)) + "\n")
        print(f"wrote {len(rows)} lines to {path}")


if __name__ == "__main__":
    main()
