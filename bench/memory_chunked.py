"""Peak memory of one forward and backward of `token_logprobs`: the full logits against the chunks.

    python bench/memory_chunked.py [--tokens 512 1024 2048] [--rows 4] [--layers 2] [--device cpu|cuda]

The model is Qwen2.5-0.5B-shaped (hidden 896, vocabulary 151936, tied embeddings) with random
weights and `--layers` layers: the logits are the same size whatever the depth, and fewer layers
keep the run short. Each variant runs in a fresh process, so that nothing earlier holds memory. On
CPU the peak is the kernel's VmHWM, reset just before the measured pass; glibc maps every block
above 64 KiB on its own and returns it when freed, so it is the peak of live tensors, not of what
the allocator kept. On CUDA it is `max_memory_allocated`. The rise is over the memory in use before
the pass: the model, its gradients' storage (a short warm-up pass made it) and the inputs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, PROMPT = 151936, 32


def measure(chunked: bool, rows: int, completion: int, layers: int, device: str) -> tuple[int, int]:
    """(peak before the pass, peak during it), bytes, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    sys.path.insert(0, str(ROOT))
    from workers.rl.loss import token_logprobs

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    ids = torch.randint(0, VOCAB, (rows, PROMPT + completion), device=device)
    attn = torch.ones_like(ids)
    chunk = None if chunked else 0

    def status(field: str) -> int:
        return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]

    warm = PROMPT + 2  # one-time allocations (gradients' storage, kernels) happen here, not below
    token_logprobs(model, ids[:, :warm], attn[:, :warm], PROMPT, chunk_tokens=chunk)[0].sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
        before = status("VmRSS")
    token_logprobs(model, ids, attn, PROMPT, chunk_tokens=chunk)[0].sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()
    return before, status("VmHWM")


def run_variant(chunked: bool, rows: int, completion: int, layers: int, device: str) -> tuple[int, int]:
    args = ["--variant", "chunked" if chunked else "full", "--rows", str(rows), "--layers", str(layers)]
    args += ["--device", device, "--tokens", str(completion * rows)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    before, after = (int(x) for x in out.stdout.split()[-2:])
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048], help="completion tokens, all rows")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # the child: one measurement
        before, after = measure(
            args.variant == "chunked", args.rows, args.tokens[0] // args.rows, args.layers, args.device
        )
        print(before, after)
        return
    mb = 1e6
    print(f"Qwen2-shaped, vocab {VOCAB}, {args.layers} layers, {args.rows} rows, prompt {PROMPT}, {args.device}")
    print("| completion tokens | (N, C, V) fp32 logits | full: peak / rise | chunked: peak / rise | rise ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for tokens in args.tokens:
        completion = tokens // args.rows
        full = run_variant(False, args.rows, completion, args.layers, args.device)
        chunked = run_variant(True, args.rows, completion, args.layers, args.device)
        logits = args.rows * completion * VOCAB * 4
        rise_full, rise_chunked = full[1] - full[0], chunked[1] - chunked[0]
        print(
            f"| {args.rows * completion} | {logits / mb:,.0f} MB | {full[1] / mb:,.0f} / {rise_full / mb:,.0f} MB"
            f" | {chunked[1] / mb:,.0f} / {rise_chunked / mb:,.0f} MB | {rise_chunked / rise_full:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
