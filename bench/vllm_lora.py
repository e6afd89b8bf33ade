"""A LoRA job's two ways into vLLM, side by side: adapters merged into a full copy (`RFT_VLLM_LORA=merge`)
or sent alone to vLLM's LoRA support (`adapter`).

    python bench/vllm_lora.py [--rounds 3] [--prompts 8] [--samples 4] [--tokens 32]

One randomly initialised SmolLM2-135M-shaped model with LoRA adapters (rank 16, every projection,
non-zero B so they change the answers) behind `workers.rl.vllm_engine.VllmEngine` in each mode, in
turn, in one run: per round, one weight sync (`update_weights` after the adapters changed) and one
sampling call (prompts x samples completions of `--tokens` tokens, EOS ignored by a random model
anyway). Needs `make vllm`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory_planner import SMOLLM2_135M  # noqa: E402


def lora_model() -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from service.models.registry import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    kind: dict[str, Any] = dict(SMOLLM2_135M)
    config = AutoConfig.for_model(
        str(kind.pop("model_type")), **kind, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")), tokenizer


def perturb(model: Any, scale: float = 0.02) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def run(mode: Literal["merge", "adapter"], args: argparse.Namespace) -> dict[str, float]:
    from service.core.settings import Settings
    from workers.rl.vllm_engine import VllmEngine

    model, tokenizer = lora_model()
    perturb(model)
    vllm = os.environ.get("RFT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    settings = Settings(vllm_python=vllm, vllm_lora=mode, vllm_dtype="float32")
    conversations = [[{"role": "user", "content": f"count from {i}: {i} {i + 1}"}] for i in range(args.prompts)]
    began = time.perf_counter()
    engine = VllmEngine(model, tokenizer, settings, max_model_len=512)
    start = time.perf_counter() - began
    sync, sampling, tokens = [], [], 0
    try:
        engine.sample(conversations[:1], 1, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)  # warm-up
        for round_ in range(args.rounds):
            perturb(model)
            engine.update_weights(model)
            sync.append(engine.weight_sync_seconds)
            t0 = time.perf_counter()
            rollout = engine.sample(
                conversations, args.samples, max_new_tokens=args.tokens, temperature=1.0, top_p=1.0, seed=round_
            )
            sampling.append(time.perf_counter() - t0)
            tokens = rollout.completion_tokens
    finally:
        engine.close()
    return {
        "start": start,
        "sync": statistics.median(sync),
        "sampling": statistics.median(sampling),
        "tokens_per_second": tokens / statistics.median(sampling),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"commit {commit.stdout.strip()}; {os.cpu_count()} CPUs; {args.prompts} prompts x {args.samples} samples x "
        f"{args.tokens} tokens, median of {args.rounds} rounds\n"
    )
    print("| RFT_VLLM_LORA | engine start | weight sync | sampling | completion tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    modes: tuple[Literal["merge", "adapter"], ...] = ("merge", "adapter")
    for mode in modes:
        r = run(mode, args)
        timing = f"{r['start']:.1f} s | {r['sync']:.3f} s | {r['sampling']:.2f} s"
        print(f"| `{mode}` | {timing} | {r['tokens_per_second']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
