"""One job on one device against the same job on two (workers/rl/ranks.py), side by side.

    python bench/distributed_bench.py [--case NAME ...] [--devices N] [--steps N]

Each case is a randomly initialised SmolLM2-135M-shaped model (bench/memory_planner.py's) trained
for a few steps twice, from the same seed and data: once in one process, once in `--devices`
processes (gloo on CPUs, where the ranks share the cores; NCCL with one GPU a rank on a machine
with that many GPUs: the same command). Each run is a real job (SQLite, local storage) run by
`workers.runner.run_job` in a fresh process, as a worker runs it. Printed: the mean step time and
its sampling and training parts (from the metrics, steps after the first), the peak resident
memory of each rank (GPU: rank 0's max_memory_reserved) beside the plan's, and how far the two
runs end apart: the largest relative difference of the per-step loss and gradient norm, and the
largest weight difference of the last checkpoint in units of the learning rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory_planner import SMOLLM2_135M, Case, create_job, job_outcome, random_model  # noqa: E402

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
    done = subprocess.run(
        [sys.executable, "-c", WORKER, job_id],
        env={**os.environ, **env, "RFT_WORKER_DEVICES": str(devices), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker failed: {done.stderr[-3000:]}")
    peaks = json.loads(done.stdout.strip().splitlines()[-1])["peaks"]
    _, plan = job_outcome(job_id, data)
    settings = Settings(data_dir=data)
    with unit_of_work(settings) as session:
        metrics = [m.data for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))]
        last = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number.desc())
        ).first()
        assert last is not None
        folder = settings.storage_dir / last.storage_key
    return {"metrics": sorted(metrics, key=lambda m: m["step"]), "peaks": peaks, "plan": plan, "folder": folder}


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else folder / "model.safetensors"))


def timing(metrics: list[dict[str, Any]]) -> str:
    later = metrics[1:] or metrics
    parts = {k: sum(m["timing"]["step"][k] for m in later) / len(later) for k in ("sampling", "training")}
    step = sum(m["timing"]["step"]["full_iteration"] for m in later) / len(later)
    return f"{step:.2f} s ({parts['sampling']:.2f} sampling, {parts['training']:.2f} training)"


def apart(one: dict[str, Any], two: dict[str, Any], learning_rate: float) -> str:
    def rel(key: str) -> float:
        return max(
            abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(one["metrics"], two["metrics"], strict=True)
        )

    wa, wb = weights(one["folder"]), weights(two["folder"])
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    same_samples = all(
        a["train_reward_mean"] == b["train_reward_mean"] for a, b in zip(one["metrics"], two["metrics"], strict=True)
    )
    return (
        f"loss {rel('loss'):.1e}, grad norm {rel('grad_norm'):.1e} (relative); weights {worst / learning_rate:.1e} lr; "
        f"same rewards every step: {'yes' if same_samples else 'no'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
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
        multiplier = case.hyperparameters["learning_rate_multiplier"]
        learning_rate = (1e-4 if case.hyperparameters.get("lora_rank") else 1e-5) * multiplier
        print(f"|  | apart | {apart(runs[1], runs[args.devices], learning_rate)} | | |", flush=True)


if __name__ == "__main__":
    main()
