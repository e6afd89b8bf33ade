"""Graded samples per second for each grader type, through the same batch interface training uses.

    python bench/graders_bench.py [--samples 5000] [--model-samples 64] [--skip-models]

Each grader grades `--samples` (sample, item) pairs in batches of 256, as a training step would; the
python grader runs in its sandbox pool; model graders run on the CPU with their real models.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

from service.core.settings import Settings
from service.graders.engine import compile_grader, grade_batch
from service.graders.schemas import SIMILARITY_METRICS, parse_grader
from service.graders.templates import Sample

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "is",
    "four",
    "seven",
    "paris",
    "capital",
    "of",
    "france",
    "cold",
    "sun",
    "number",
    "reward",
    "policy",
    "step",
]
PY_SOURCE = """
def grade(sample, item):
    return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
"""


def pairs(n: int, seed: int = 0) -> tuple[list[Sample], list[dict[str, Any]]]:
    rng = random.Random(seed)
    samples, items = [], []
    for _ in range(n):
        answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
        output = answer if rng.random() < 0.3 else " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
        samples.append(Sample.from_text(output))
        items.append({"answer": answer})
    return samples, items


def graders(model_samples: bool) -> list[tuple[str, dict[str, Any]]]:
    base = {"input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    out: list[tuple[str, dict[str, Any]]] = [
        ("string_check eq", {"type": "string_check", "name": "g", "operation": "eq", **base}),
        ("string_check ilike", {"type": "string_check", "name": "g", "operation": "ilike", **base}),
    ]
    out += [
        (f"text_similarity {m}", {"type": "text_similarity", "name": "g", "evaluation_metric": m, **base})
        for m in SIMILARITY_METRICS
    ]
    out.append(("python (sandbox pool)", {"type": "python", "name": "g", "source": PY_SOURCE}))
    out.append(
        (
            "multi (string_check + fuzzy_match)",
            {
                "type": "multi",
                "name": "g",
                "calculate_output": "0.5*a+0.5*b",
                "graders": {"a": out[0][1], "b": out[2][1]},
            },
        )
    )
    if model_samples:
        for model in ("tiny-random-llama", "smollm2-135m-instruct"):
            out.append(
                (
                    f"score_model {model}",
                    {
                        "type": "score_model",
                        "name": "g",
                        "model": model,
                        "range": [0, 1],
                        "input": [{"role": "user", "content": "Grade 0-1: {{sample.output_text}} vs {{item.answer}}"}],
                        "sampling_params": {"max_completions_tokens": 8},
                    },
                )
            )
    return out


def measure(config: dict[str, Any], samples: list[Sample], items: list[dict[str, Any]], settings: Settings) -> float:
    with compile_grader(parse_grader(config), settings) as compiled:
        grade_batch(compiled, samples[:8], items[:8])  # warm-up: pools start, models load
        started = time.perf_counter()
        for i in range(0, len(samples), 256):
            grade_batch(compiled, samples[i : i + 256], items[i : i + 256])
        return len(samples) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--model-samples", type=int, default=64)
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    settings = Settings(data_dir=Path(os.environ.get("RFT_DATA_DIR", "~/.rft")).expanduser())
    samples, items = pairs(args.samples)
    print(f"{os.cpu_count()} CPUs; {args.samples} samples per grader ({args.model_samples} for model graders)")
    print(f"{'grader':40s} {'samples/s':>12s}")
    for label, config in graders(not args.skip_models):
        n = args.model_samples if config["type"] == "score_model" else args.samples
        rate = measure(config, samples[:n], items[:n], settings)
        print(f"{label:40s} {rate:12,.0f}", flush=True)


if __name__ == "__main__":
    main()
