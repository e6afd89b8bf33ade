"""Ours against TRL over several seeds: the `--json-out` reports of `trl_compare.py`, one per seed.

    python bench/seeds_summary.py run_seed1.json run_seed2.json ...

One evaluation's validation reward (64 prompts, greedy) has a standard error of about 0.05 and the
seed moves it by more than that, so a single seed cannot show two frameworks' rewards equal. This
prints, per mode, a row per seed (validation reward after training, mean training reward over the
steps, throughput of both) and then the means with the standard error of the paired differences.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Pair:
    seed: int
    mode: str
    ours: dict[str, Any]
    trl: dict[str, Any]


def pairs(reports: list[dict[str, Any]]) -> list[Pair]:
    """Every (seed, mode) that has both frameworks, in the order given."""
    found = []
    for report in reports:
        # The matched pair: ours on the torch engine in fp32 ("ours" in reports before f28c5a4), TRL in fp32.
        by_key = {(r["framework"].replace("ours (torch)", "ours"), r["mode"]): r for r in report["results"]}
        for mode in ("lora", "full"):
            if ("ours", mode) in by_key and ("trl", mode) in by_key:
                found.append(Pair(report["settings"]["seed"], mode, by_key["ours", mode], by_key["trl", mode]))
    return found


def train_reward(result: dict[str, Any]) -> float:
    return statistics.fmean(step["train_reward"] for step in result["steps"])


def mean_and_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def summary(found: list[Pair]) -> str:
    lines = []
    for mode in ("lora", "full"):
        rows = [p for p in found if p.mode == mode]
        if not rows:
            continue
        lines += [
            f"## {mode}: {len(rows)} seeds",
            "",
            "| seed | valid after: ours | TRL | ours - TRL | mean train reward: ours | TRL "
            "| completions/s: ours | TRL | ours / TRL |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in rows:
            o, t = p.ours, p.trl
            ratio = o["completions_per_second"] / t["completions_per_second"]
            lines.append(
                f"| {p.seed} | {o['valid_after']:.3f} | {t['valid_after']:.3f} | "
                f"{o['valid_after'] - t['valid_after']:+.3f} | {train_reward(o):.3f} | {train_reward(t):.3f} | "
                f"{o['completions_per_second']:.2f} | {t['completions_per_second']:.2f} | {ratio:.2f}x |"
            )
        valid, valid_se = mean_and_se([p.ours["valid_after"] - p.trl["valid_after"] for p in rows])
        train, train_se = mean_and_se([train_reward(p.ours) - train_reward(p.trl) for p in rows])
        ratios = [p.ours["completions_per_second"] / p.trl["completions_per_second"] for p in rows]
        lines += [
            "",
            f"validation reward after: ours {statistics.fmean(p.ours['valid_after'] for p in rows):.3f}, "
            f"TRL {statistics.fmean(p.trl['valid_after'] for p in rows):.3f}; "
            f"ours - TRL {valid:+.3f} (standard error {valid_se:.3f})",
            f"mean training reward: ours - TRL {train:+.3f} (standard error {train_se:.3f})",
            f"throughput ours / TRL: geometric mean {math.exp(statistics.fmean(map(math.log, ratios))):.2f}x, "
            f"lowest {min(ratios):.2f}x",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="trl_compare.py --json-out files")
    args = parser.parse_args()
    found = pairs([json.loads(path.read_text()) for path in args.reports])
    if not found:
        parser.error("no report has both ours and TRL for the same mode")
    print(summary(found))


if __name__ == "__main__":
    main()
