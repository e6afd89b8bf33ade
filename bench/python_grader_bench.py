"""Samples per second of PythonGraderPool.grade_many for a trivial grader, by pool size, and a sandbox's
cold start (bubblewrap builds the root, the worker confines itself and loads the source, one grade).

    python bench/python_grader_bench.py [--calls 5000] [--sizes 1 2 4] [--cold 10]

Start-up is timed apart from the steady state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from service.core.settings import get_settings
from service.graders.isolation import isolation_for
from service.graders.sandbox import PythonGraderPool

SOURCE = """\
def grade(sample, item):
    return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cold", type=int, default=10, help="sandboxes started one at a time, for the cold start")
    args = parser.parse_args()
    calls = [({"output_text": f" {i % 10} "}, {"answer": str(i % 7)}) for i in range(args.calls)]
    print(f"{os.cpu_count()} CPUs; sandbox: {isolation_for(get_settings()).mechanism}")
    cold = []
    for _ in range(args.cold):
        started = time.perf_counter()
        with PythonGraderPool(SOURCE, size=1) as pool:
            assert pool.grade_many(calls[:1])[0].error_type is None
            cold.append(time.perf_counter() - started)
    if cold:
        print(
            f"cold start to the first grade: median {statistics.median(cold) * 1000:.0f} ms, "
            f"max {max(cold) * 1000:.0f} ms (first {cold[0] * 1000:.0f} ms, {len(cold)} sandboxes)"
        )
    for size in args.sizes:
        started = time.perf_counter()
        with PythonGraderPool(SOURCE, size=size) as pool:
            pool.grade_many(calls[:size])  # every sandbox started and loaded
            ready = time.perf_counter()
            outcomes = pool.grade_many(calls)
            elapsed = time.perf_counter() - ready
        assert all(o.error_type is None for o in outcomes), next(o for o in outcomes if o.error_type)
        print(
            f"pool of {size}: {args.calls / elapsed:8.0f} samples/s "
            f"({args.calls} calls in {elapsed:.2f}s; start-up {ready - started:.2f}s)"
        )


if __name__ == "__main__":
    main()
