"""What only a CUDA device can show: training on it, the chunked loss's memory there, vLLM on it.

Marked `cuda` and skipped, saying so, where torch sees no CUDA device (this machine, CI).
`bench/gpu_check.sh` runs them first on a lent GPU machine (`pytest -m cuda`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.models.registry import tiny_llama
from tests.conftest import train_local_model
from tests.support.models import tiny_config
from workers.rl.engine import TorchEngine
from workers.rl.loss import token_logprobs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (bench/gpu_check.sh runs these)"),
]

ROOT = Path(__file__).resolve().parent.parent


def test_a_job_trains_on_cuda(sqlite_live: tuple[TestClient, dict[str, str], Settings], tmp_path: Path) -> None:
    client, auth, settings = sqlite_live  # SQLite: a lent GPU machine has no PostgreSQL
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    lines = [{"messages": [{"role": "user", "content": f"say a {i}"}]} for i in range(4)]
    grader = {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "a"}
    grader["operation"] = "like"
    hyper = {"batch_size": 4, "compute_multiplier": 2, "max_completion_tokens": 6, "eval_samples": 2, "n_epochs": 1}
    train_local_model(client, auth, settings, tmp_path / "tiny", lines, grader, hyper)


def test_a_lora_policy_on_cuda_holds_its_frozen_base_in_bf16_by_default() -> None:
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy

    cfg = resolve({"lora_rank": 4}, n_train=4)
    model, _ = build_policy("tiny-random-llama", cfg, Settings(), "cuda", seed=0)
    kinds = {(p.requires_grad, p.dtype, p.device.type) for p in model.parameters()}
    assert kinds == {(False, torch.bfloat16, "cuda"), (True, torch.float32, "cuda")}


def peak_of(model: Any, ids: torch.Tensor, chunk_tokens: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logp, _ = token_logprobs(model, ids, torch.ones_like(ids), 8, chunk_tokens=chunk_tokens)
    logp.sum().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return float(torch.cuda.max_memory_allocated() - before), logp.detach()


def test_chunked_log_probs_hold_a_fraction_of_the_full_logits_memory_on_cuda() -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("Qwen2Config", 151936, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda().train()
    ids = torch.randint(0, 151936, (4, 8 + 1024), device="cuda")
    full_peak, full = peak_of(model, ids, 0)
    chunked_peak, chunked = peak_of(model, ids, 256)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    assert chunked_peak < 0.5 * full_peak, f"chunked {chunked_peak / 2**20:.0f} MiB vs full {full_peak / 2**20:.0f} MiB"


def test_vllm_on_cuda_answers_as_the_torch_engine() -> None:
    vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
    if not vllm_python.is_file():
        pytest.skip(f"no vLLM environment at {vllm_python}")
    from workers.rl.vllm_engine import VllmEngine

    model, tokenizer = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    model = model.cuda().eval()
    engine = VllmEngine(model, tokenizer, Settings(vllm_python=str(vllm_python)))
    try:
        conversations = [[{"role": "user", "content": "count: 1 2 3"}]]
        kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0, "greedy": True}
        ours = TorchEngine(model, tokenizer).sample(conversations, 1, **kw)
        theirs = engine.sample(conversations, 1, **kw)
        assert theirs.texts == ours.texts
    finally:
        engine.close()
