"""One job on one device against the same job on two (workers/rl/ranks.py), side by side.

    python bench/distributed_bench.py [--case NAME ...] [--devices N] [--steps N]

Each case is a randomly initialised SmolLM2-135M-shaped model (bench/memory_planner.py's) trained
for a few steps twice, from the same seed and data: once in one process, once in `--devices`
processes (gloo on CPUs, where the ranks share the cores; NCCL with one GPU a rank on a machine
with that many GPUs: the same command). Each run is a real job (SQLite, local storage) run by
`workers.runner.run_job` in a fresh process, as a worker runs it. Printed: the mean step time and
its sampling and training parts (from the metrics, steps after the first), the peak resident
memory of each rank (GPU: rank 0's max_memory_reserved) beside the plan's, and how far apart the
runs are: at step 1, which starts from the same weights and samples the same completions, by float
rounding alone (the ranks sum in another order); after the last step, the final weights' distance
relative to how far training moved them, beside the same figure for one process run with another
micro-batch size. Later steps drift by float noise in any run: AdamW turns a near-zero gradient's
rounding into up to a learning-rate step, and a randomly initialised model's near-uniform
distributions then sample other tokens from slightly other weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory_planner import COMMON as COMMON_PLANNER  # noqa: E402
from memory_planner import SMOLLM2_135M, Case, create_job, job_outcome, random_model, run_worker  # noqa: E402

COMMON = {"batch_size": 4, "compute_multiplier": 1, "max_completion_tokens": 32, "eval_samples": 1}
CASES = {
    "smollm2-full": Case("smollm2-full", SMOLLM2_135M, {**COMMON, "learning_rate_multiplier": 10}, examples=8),
    "smollm2-lora": Case(
        "smollm2-lora", SMOLLM2_135M, {**COMMON, "lora_rank": 16, "learning_rate_multiplier": 10}, examples=8
    ),
}

# Rank 0 runs the job; a thread samples the other ranks' high-water marks while they live.
WORKER = """
import json, re, sys, threading, time
from pathlib import Path
from service.core.settings import Settings
from workers import runner

followers = {}

def hwm(pid):
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024

def watch():
    me = str(Path("/proc/self").resolve().name)
    while True:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"workers.rl.follower" in (entry / "cmdline").read_bytes():
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                        followers[entry.name] = max(followers.get(entry.name, 0), hwm(entry.name))
            except (OSError, AttributeError):
                pass
        time.sleep(0.05)

threading.Thread(target=watch, daemon=True).start()
runner.run_job(sys.argv[1], Settings())
peak = hwm("self")
import torch
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_reserved()
print(json.dumps({"peaks": [peak, *followers.values()]}))
"""


def run(case: Case, work: Path, devices: int, steps: int) -> dict[str, Any]:
    from sqlalchemy import select

    from service.core.db import unit_of_work
    from service.core.settings import Settings
    from service.core.tables import Checkpoint, JobMetric

    model = random_model(work / "models" / case.name, case.config)
    data = Path(tempfile.mkdtemp(prefix=f"{case.name}-{devices}-", dir=work))
    hp = {**case.hyperparameters, "n_devices": devices, "n_epochs": steps * COMMON["batch_size"] // case.examples}
    job_id, env = create_job(Case(case.name, case.config, hp, examples=case.examples), model, data)
    peaks = run_worker(job_id, {**env, "RFT_WORKER_DEVICES": str(devices)}, WORKER)["peaks"]
    _, plan = job_outcome(job_id, data)
    settings = Settings(data_dir=data)
    with unit_of_work(settings) as session:
        metrics = [m.data for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))]
        last = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number.desc())
        ).first()
        assert last is not None
        folder = settings.storage_dir / last.storage_key
    return {
        "metrics": sorted(metrics, key=lambda m: m["step"]),
        "peaks": peaks[:devices],  # rank 0's, then each other rank's
        "plan": plan,
        "folder": folder,
        "model": model,
        "hyperparameters": {**COMMON_PLANNER, **hp},
    }


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else folder / "model.safetensors"))


def timing(metrics: list[dict[str, Any]]) -> str:
    later = metrics[1:] or metrics
    parts = {k: sum(m["timing"]["step"][k] for m in later) / len(later) for k in ("sampling", "training")}
    step = sum(m["timing"]["step"]["full_iteration"] for m in later) / len(later)
    return f"{step:.2f} s ({parts['sampling']:.2f} sampling, {parts['training']:.2f} training)"


def initial_weights(case: Case, model: Path, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The trained weights before step 1, as the worker builds them (the job's seed: memory_planner's 3)."""
    from peft import get_peft_model_state_dict

    from service.core.settings import Settings
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy

    cfg = resolve(hyperparameters, case.examples)
    policy, _ = build_policy(str(model), cfg, Settings(rollout_engine="torch"), "cpu", seed=3)
    state = get_peft_model_state_dict(policy) if cfg.lora_rank else policy.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def gap(one: dict[str, Any], two: dict[str, Any], start: dict[str, Any]) -> float:
    """The distance between two runs' final weights, relative to how far the first run moved them."""
    wa, wb = weights(one["folder"]), weights(two["folder"])
    keys = [k for k in wa if k in start]
    apart = sum(float((wa[k] - wb[k]).double().pow(2).sum()) for k in keys) ** 0.5
    moved = sum(float((wa[k] - start[k]).double().pow(2).sum()) for k in keys) ** 0.5
    return apart / moved


def first_step(one: dict[str, Any], two: dict[str, Any]) -> str:
    """Step 1 starts from the same weights and samples the same completions: the loss and gradient
    norm of the two runs there differ by float rounding alone."""
    a, b = one["metrics"][0], two["metrics"][0]
    return ", ".join(f"{k} {abs(a[k] - b[k]) / max(abs(a[k]), 1e-12):.1e}" for k in ("loss", "grad_norm"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distributed-bench-"))  # about 5 GB a case: removed at the end
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    import torch

    where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    print(f"commit {commit.stdout.strip()}; {where}, {len(os.sched_getaffinity(0))} cores; {args.steps} steps\n")
    print("| case | processes | step (mean of steps 2+) | peak per rank (GiB) | plan per rank (GiB) |")
    print("|---|---|---|---|---|")
    for name in args.case:
        case = CASES[name]
        runs = {n: run(case, work, n, args.steps) for n in (1, args.devices)}
        for n, result in runs.items():
            peaks = ", ".join(f"{p / 2**30:.2f}" for p in result["peaks"])
            plan = result["plan"]["peak"] / 2**30
            print(f"| {name} | {n} | {timing(result['metrics'])} | {peaks} | {plan:.2f} |", flush=True)
        smaller = replace(case, hyperparameters={**case.hyperparameters, "micro_batch_size": 4})
        control = run(smaller, work, 1, args.steps)
        start = initial_weights(case, runs[1]["model"], runs[1]["hyperparameters"])
        print(
            f"|  | apart | step 1, relative: {first_step(runs[1], runs[args.devices])}; final weights "
            f"{gap(runs[1], runs[args.devices], start):.1e} of the distance moved (one process with micro-batches "
            f"of 4 instead: {gap(runs[1], control, start):.1e}) | | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
