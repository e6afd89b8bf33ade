"""Samples per second of each text_similarity metric on short answer pairs (5-30 words).

    python bench/similarity_bench.py [--pairs 2000] [--metrics bleu,rouge_l] [--repeat 3]

Pairs are made from a fixed seed: a reference sentence and an output that keeps most of its words,
substitutes, drops and inserts a few, as a sampled answer does. All pairs are distinct, so
``similarity_many``'s de-duplication does not flatter the numbers. The first call of a metric (imports,
model load) is timed apart as "setup".
"""

from __future__ import annotations

import argparse
import random
import time

from service.graders.similarity import METRICS, similarity, similarity_many

VOCABULARY = (
    "the a of to and in is was for on that with as by it at from this be are or an which not "
    "answer result value number total sum equals therefore because so thus first second third final "
    "capital city country river mountain population year century war king queen president law "
    "France Paris Germany Berlin Japan Tokyo water energy mass speed light time distance force "
    "increase decrease grows falls runs running ran quickly slowly large small larger smaller "
    "protein cell gene enzyme reaction acid molecule atom charge field wave frequency signal"
)
WORDS = VOCABULARY.split()


def make_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs: dict[tuple[str, str], None] = {}
    while len(pairs) < count:
        reference = [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
        output: list[str] = []
        for word in reference:
            roll = rng.random()
            if roll < 0.75:
                output.append(word)
            elif roll < 0.88:
                output.append(rng.choice(WORDS))
            elif roll < 0.94:
                output.extend([word, rng.choice(WORDS)])
        if rng.random() < 0.3:
            output[0:0] = ["The", "answer", "is"]
        pairs[(" ".join(output) + rng.choice(("", ".", " .")), " ".join(reference))] = None
    return list(pairs)


def bench(metric: str, pairs: list[tuple[str, str]], repeat: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    similarity(metric, *pairs[0])
    setup = time.perf_counter() - start
    batched = single = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        similarity_many(metric, pairs)
        batched = max(batched, len(pairs) / (time.perf_counter() - start))
        if metric != "cosine":  # one by one, the cosine model would run batches of one
            start = time.perf_counter()
            for output, reference in pairs:
                similarity(metric, output, reference)
            single = max(single, len(pairs) / (time.perf_counter() - start))
    return setup, batched, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--metrics", default=",".join(METRICS))
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    pairs = make_pairs(args.pairs)
    words = sum(len(o.split()) + len(r.split()) for o, r in pairs) / (2 * len(pairs))
    print(f"{len(pairs)} pairs, {words:.1f} words per text on average")
    print(f"{'metric':<12} {'setup s':>8} {'many/s':>10} {'single/s':>10}")
    for metric in args.metrics.split(","):
        setup, batched, single = bench(metric, pairs, args.repeat)
        single_text = f"{single:>10.0f}" if single else f"{'-':>10}"
        print(f"{metric:<12} {setup:>8.2f} {batched:>10.0f} {single_text}", flush=True)


if __name__ == "__main__":
    main()
