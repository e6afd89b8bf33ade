"""Rollout engines side by side: the torch decode loop and vLLM (`make vllm`) on the same model and prompts.

    python bench/engine_sampling.py [--model smollm2-135m-instruct | --random qwen2-1.5b] [--prompts 8]
                                    [--samples 4] [--tokens 64] [--rounds 3] [--threads N]
                                    [--dtype fp32|bf16] [--engines torch vllm] [--device cpu|cuda]

Both engines sample the same conversations through the `RolloutEngine` interface the training loop
uses (`workers/rl/engine.py`), rounds alternating so that both see the same background load. Shown:
completion tokens per second (median round), the vLLM sidecar's start-up, and its weight sync (write
the trainer's weights to /dev/shm and reload them in place) after a perturbation, as the loop does
after every optimizer step, alternating with the way it was done before 830cdf7 (a new safetensors
file each time, reloaded from its folder; the sidecar still takes it). `--random` builds a model of
a known family's config with random weights (throughput needs no trained weights, and a GPU machine
lent to us reaches no hub). On CUDA the peak GPU memory of this process (the torch engine's) is
printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.core.settings import Settings  # noqa: E402
from service.models.memory_plan import BUILTIN_CONFIGS  # noqa: E402
from service.models.registry import load_fresh, resolve  # noqa: E402
from workers.rl.engine import RolloutEngine, TorchEngine  # noqa: E402

QUESTIONS = [
    "What is 17 + 25? Answer with the number.",
    "Name a prime number between 20 and 30.",
    "Spell the word 'cat' backwards.",
    "What is the capital of France?",
    "Give one word that rhymes with 'light'.",
    "How many legs does a spider have?",
    "What is 9 times 7?",
    "Write the next number: 2, 4, 8, 16, ...",
]


# Configs of real models (their config.json's shape fields), for throughput on random weights.
# smollm2-135m is our built-in model's shape, for a machine without its weights (a lent GPU machine:
# the GGUF is 98 MB, more than the device tool carries).
SMOLLM2 = {k: v for k, v in BUILTIN_CONFIGS["smollm2-135m-instruct"].items() if k != "vocab_size"}
RANDOM: dict[str, dict[str, Any]] = {
    "smollm2-135m": SMOLLM2,
    "qwen2-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}


def random_model(name: str) -> tuple[Any, Any]:
    """A model of `RANDOM[name]`'s shape with random weights, over our byte-level test tokenizer
    (its vocabulary is small: the figures are the layers', not a 150k-token head's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from service.models.registry import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    shape = dict(RANDOM[name])
    config = AutoConfig.for_model(shape.pop("model_type"), vocab_size=len(tokenizer), **shape)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def timed_sample(engine: RolloutEngine, args: argparse.Namespace, seed: int) -> tuple[float, int]:
    began = time.perf_counter()
    rollout = engine.sample(
        conversations(args.prompts), args.samples, max_new_tokens=args.tokens, temperature=1.0, top_p=1.0, seed=seed
    )
    return time.perf_counter() - began, rollout.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random", choices=sorted(RANDOM), help="random weights of this config instead of --model")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync-rounds", type=int, default=3, help="weight syncs timed each way")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--engines", nargs="+", choices=["torch", "vllm"], default=["torch", "vllm"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    vllm_python = os.environ.get("RFT_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    parser.add_argument("--vllm-python", default=vllm_python)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "rft-bench-data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(data_dir=Path(args.data_dir), vllm_python=args.vllm_python, vllm_threads=args.threads)
    model, tokenizer = random_model(args.random) if args.random else load_fresh(resolve(args.model), settings)
    model = model.to(device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    began = time.perf_counter()
    engines: dict[str, RolloutEngine] = {}
    if "torch" in args.engines:
        engines["torch"] = TorchEngine(model, tokenizer)
    started = ""
    if "vllm" in args.engines:
        from workers.rl.vllm_engine import VllmEngine

        vllm = VllmEngine(model, tokenizer, settings)
        engines["vllm"] = vllm
        started = f"; vLLM sidecar up in {time.perf_counter() - began:.1f} s (its engine {vllm.start_seconds:.1f} s)"
    print(
        f"{args.random or args.model} {args.dtype} on {args.device}, {args.prompts} prompts x {args.samples} samples "
        f"x {args.tokens} tokens, {args.threads} threads{started}"
    )
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in engines}
    for engine in engines.values():
        timed_sample(engine, args, seed=999)  # warm-up: first-call allocations
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for r in range(args.rounds):
        for name, engine in engines.items():
            runs[name].append(timed_sample(engine, args, seed=r))
    print(f"{'engine':<8}{'tokens/s':>10}{'s/round':>9}   each round (s, tokens)")
    rates = {}
    for name, rounds in runs.items():
        rates[name] = statistics.median(tokens / seconds for seconds, tokens in rounds)
        each = ", ".join(f"{s:.2f} {t}" for s, t in rounds)
        print(f"{name:<8}{rates[name]:>10.1f}{statistics.median(s for s, _ in rounds):>9.2f}   {each}")
    if args.device == "cuda":
        print(f"peak GPU memory of the torch engine's process: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if "vllm" in engines:
        if "torch" in engines:
            print(f"vLLM / torch sampling rate: {rates['vllm'] / rates['torch']:.2f}x")
        syncs: dict[str, list[float]] = {"shared": [], "file": []}
        with torch.no_grad():
            for round_ in range(args.sync_rounds + 1):  # the ways alternating, so that both see the same load
                for way in syncs:
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 1e-4)
                    began = time.perf_counter()
                    if way == "shared":
                        vllm.update_weights(model)  # what the loop does
                    else:
                        vllm._write(model)  # a safetensors file of the merged weights, reloaded from its folder
                        vllm._ask({"op": "reload", "path": str(vllm.folder)})
                    if round_:  # round 0 warms up: the first sync lays out and maps the shared file
                        syncs[way].append(time.perf_counter() - began)
        print("weight sync, median (each round) s:")
        for way, label in (("shared", "shared-memory mapping"), ("file", "safetensors file")):
            each = ", ".join(f"{s:.2f}" for s in syncs[way])
            print(f"  {label:<22} {statistics.median(syncs[way]):.3f}   ({each})")
        vllm.close()


if __name__ == "__main__":
    main()
