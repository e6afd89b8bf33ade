"""Reinforcement fine-tuning demo: teach smollm2-135m-instruct to get small sums right.

Starts nothing itself: run `rft serve` first and point this at it (OPENAI_BASE_URL / OPENAI_API_KEY,
or --base-url / --api-key). Everything goes through the public API with the official `openai` SDK:
upload train.jsonl and valid.jsonl, create a reinforcement job with grader.json, poll it with a
one-line progress print per step, then print the baseline validation reward, the final-model
selection and the wall time.

    python examples/arithmetic/make_data.py
    python examples/arithmetic/run_demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

HERE = Path(__file__).resolve().parent
TERMINAL = {"succeeded", "failed", "cancelled"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the arithmetic RFT demo against a running `rft serve`.")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--train", type=Path, default=HERE / "train.jsonl")
    p.add_argument("--valid", type=Path, default=HERE / "valid.jsonl")
    p.add_argument("--grader", type=Path, default=HERE / "grader.json")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--poll", type=float, default=5.0, help="seconds between polls")
    p.add_argument("--metrics-out", type=Path, help="also write every step's metrics (JSON list) here")
    hp = p.add_argument_group("hyperparameters (method.reinforcement.hyperparameters)")
    hp.add_argument("--n-epochs", type=int, default=2)
    hp.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    hp.add_argument("--compute-multiplier", type=float, default=1.0, help="samples per prompt = 4 x this")
    hp.add_argument("--learning-rate-multiplier", type=float, default=3.0, help="learning rate = 1e-5 x this")
    hp.add_argument("--eval-interval", type=int, default=4)
    hp.add_argument("--eval-samples", type=int, default=1)
    hp.add_argument("--max-completion-tokens", type=int, default=16)
    hp.add_argument("--temperature", type=float, default=0.7)
    hp.add_argument("--beta", type=float, default=0.02)
    hp.add_argument("--kl-limit", type=float, default=0.5)
    hp.add_argument("--warmup-steps", type=int, default=0)
    return p.parse_args()


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "n_epochs": args.n_epochs,
        "batch_size": args.batch_size,
        "compute_multiplier": args.compute_multiplier,
        "learning_rate_multiplier": args.learning_rate_multiplier,
        "eval_interval": args.eval_interval,
        "eval_samples": args.eval_samples,
        "max_completion_tokens": args.max_completion_tokens,
        "temperature": args.temperature,
        "beta": args.beta,
        "kl_limit": args.kl_limit,
        "warmup_steps": args.warmup_steps,
    }


def new_events(client: OpenAI, job_id: str, seen: set[str]) -> list[Any]:
    """Events not printed yet, oldest first (the API lists newest first)."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.id in seen:
            break
        fresh.append(event)
    for event in fresh:
        seen.add(event.id)
    return fresh[::-1]


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def progress_line(data: dict[str, Any]) -> str:
    t = data.get("timing", {}).get("step", {})
    eval_part = f" eval {t['eval']:.0f}s" if t.get("eval") else ""
    return (
        f"step {data['step']:>3}/{data.get('total_steps', '?')}"
        f"  train reward {fmt(data.get('train_reward_mean'))}"
        f"  valid reward {fmt(data.get('valid_reward_mean'))}"
        f"  kl {fmt(data.get('kl'), '.4f')}"
        f"  len {fmt(data.get('completion_tokens_mean'), '.1f')}"
        f"  | sample {t.get('sampling', 0):.0f}s score {t.get('scoring', 0):.1f}s"
        f" train {t.get('training', 0):.0f}s{eval_part}"
    )


def main() -> int:
    args = parse_args()
    if not args.api_key:
        sys.exit("Set OPENAI_API_KEY (printed by `rft serve`, also in $RFT_DATA_DIR/api_key) or pass --api-key.")
    for path in (args.train, args.valid):
        if not path.exists():
            sys.exit(f"{path} is missing: run `python {HERE / 'make_data.py'}` first.")
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    grader = json.loads(args.grader.read_text())
    print(f"validating grader {args.grader.name}: ", end="", flush=True)
    client.fine_tuning.alpha.graders.validate(grader=grader)
    print("ok")

    with open(args.train, "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune")
    with open(args.valid, "rb") as f:
        valid = client.files.create(file=f, purpose="fine-tune")
    print(f"uploaded {args.train.name} -> {train.id}, {args.valid.name} -> {valid.id}")

    hp = hyperparameters(args)
    # Our extras (beta, kl_limit, ...) are not in the SDK's typed Method, so the dict is passed as is.
    method: Any = {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}
    started = time.time()
    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=train.id,
        validation_file=valid.id,
        seed=args.seed,
        suffix="arithmetic",
        method=method,
    )
    print(f"created {job.id} ({args.model}) with {json.dumps(hp)}")

    def cancel(*_: Any) -> None:
        print(f"\ninterrupted: cancelling {job.id}")
        client.fine_tuning.jobs.cancel(job.id)
        sys.exit(130)

    signal.signal(signal.SIGINT, cancel)

    seen: set[str] = set()
    metrics: list[dict[str, Any]] = []
    baseline = selection = None
    status = job.status
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in new_events(client, job.id, seen):
            data = event.data if isinstance(event.data, dict) else {}
            if event.type == "metrics":
                metrics.append(data)
                print(f"[{time.time() - started:6.0f}s] {progress_line(data)}", flush=True)
                continue
            if event.message.startswith("Baseline validation reward"):
                baseline = event
            if event.message.startswith("Final model"):
                selection = event
            print(f"[{time.time() - started:6.0f}s] {event.level}: {event.message}", flush=True)
        if job.status != status:
            status = job.status
            print(f"[{time.time() - started:6.0f}s] status: {status}", flush=True)
        if job.status in TERMINAL:
            break
        time.sleep(args.poll)
    wall = time.time() - started

    if args.metrics_out:
        args.metrics_out.write_text(json.dumps(metrics, indent=1))
    print()
    print(f"job {job.id}: {job.status}" + (f", model {job.fine_tuned_model}" if job.fine_tuned_model else ""))
    if job.error and job.error.message:
        print(f"error: {job.error.message}")
    if baseline is not None:
        print(baseline.message)
    evals = [(m["step"], m["valid_reward_mean"]) for m in metrics if m.get("valid_reward_mean") is not None]
    if evals:
        print("validation reward by step: " + ", ".join(f"{s}: {r:.3f}" for s, r in evals))
    if selection is not None:
        print(selection.message)
    timings = [m.get("timing", {}).get("step", {}) for m in metrics]
    if timings:
        mean = {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in ("sampling", "scoring", "training")}
        print("mean per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in mean.items()))
    if job.finished_at:
        print(f"job wall time (created -> finished): {job.finished_at - job.created_at} s")
    print(f"total wall time (this script): {wall:.0f} s")
    return 0 if job.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
