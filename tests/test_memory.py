"""Chunked log-probs give the full logits' numbers at a fraction of their memory; gradient
checkpointing gives the same update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.conftest import job_body
from tests.support.models import tiny_config
from workers.rl.chunked import head_of
from workers.rl.config import resolve
from workers.rl.loss import policy_loss, token_logprobs
from workers.rl.policy import build_policy

ROOT = Path(__file__).resolve().parent.parent
PROMPT, COMPLETION = 6, 7


def rows(vocab: int, owners: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), (N, PROMPT + COMPLETION): rows with the same owner share a prompt,
    as a group's samples do; every other prompt is left-padded by two."""
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, vocab, (max(owners) + 1, PROMPT), generator=gen)
    ids = torch.cat([prompts[owners], torch.randint(0, vocab, (len(owners), COMPLETION), generator=gen)], dim=1)
    attn = torch.ones_like(ids)
    for row, owner in enumerate(owners):
        if owner % 2:
            attn[row, :2] = 0
    return ids, attn


def scored(model: Any, ids: torch.Tensor, attn: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, ...]:
    """(log-probs, entropies, every gradient) of a weighted sum of the log-probs, so that each token's
    gradient counts differently."""
    model.zero_grad()
    logp, entropy = token_logprobs(model, ids, attn, PROMPT, **kw)
    weights = torch.linspace(-1, 2, logp.numel()).view_as(logp)
    (logp * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert grads
    return logp.detach(), entropy, *grads


def assert_same(chunked: tuple[torch.Tensor, ...], full: tuple[torch.Tensor, ...]) -> None:
    assert len(chunked) == len(full)
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked[2:], full[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", [None, "all-linear", ["q_proj", "lm_head"]])
@pytest.mark.parametrize("owners", [[0, 1, 2, 3], [0, 0, 0, 1, 1, 2]], ids=["own prompts", "shared prompts"])
def test_chunked_logprobs_equal_the_full_logits_in_value_and_gradient(
    settings: Settings, targets: Any, owners: list[int]
) -> None:
    hp = {"lora_rank": 4, "lora_target_modules": targets} if targets else {}
    model, _ = build_policy("tiny-random-llama", resolve(hp, 3), settings, "cpu", seed=0)
    assert head_of(model) is not None
    ids, attn = rows(model.config.vocab_size, owners)
    # 5 does not divide the tokens: the last chunk is short.
    assert_same(scored(model, ids, attn, chunk_tokens=5), scored(model, ids, attn, chunk_tokens=0))


@pytest.mark.parametrize("targets", [None, ["q_proj", "lm_head"]])
def test_chunked_logprobs_under_autocast_equal_the_full_logits_to_bf16_precision(
    settings: Settings, targets: Any
) -> None:
    hp = {"lora_rank": 4, "lora_target_modules": targets} if targets else {}
    model, _ = build_policy("tiny-random-llama", resolve(hp, 3), settings, "cpu", seed=0)
    ids, attn = rows(model.config.vocab_size, [0, 0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, full = scored(model, ids, attn, chunk_tokens=5), scored(model, ids, attn, chunk_tokens=0)
    fp32 = scored(model, ids, attn, chunk_tokens=0)
    assert (full[0] - fp32[0]).abs().max() > 1e-4  # autocast did run the head in bf16
    for a, b in zip(chunked, full, strict=True):
        assert float((a - b).norm()) <= 1e-2 * float(b.norm()) + 1e-6  # LoRA A: zero while B is


def test_gemmas_softcapped_head_is_reproduced() -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("Gemma2Config", 300, final_logit_softcapping=0.5)  # the tanh bends every logit
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids, attn = rows(300, [0, 1, 2])
    head = head_of(model)
    assert head is not None and head.softcap == 0.5
    assert_same(scored(model, ids, attn, chunk_tokens=4), scored(model, ids, attn, chunk_tokens=0))


def test_a_head_the_chunks_cannot_reproduce_keeps_the_full_logits() -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("CohereConfig", 300, num_hidden_layers=1, logit_scale=0.25)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, attn = rows(300, [0, 1])
    assert head_of(model) is None
    logp, _ = token_logprobs(model, ids, attn, PROMPT, chunk_tokens=3)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    expected = logits[:, PROMPT - 1 : -1].log_softmax(-1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)


PEAK = """
import re, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from workers.rl.loss import token_logprobs

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

chunk, vocab, n, prompt, completion = (int(a) for a in sys.argv[1:])
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
)
model = AutoModelForCausalLM.from_config(config).train()
ids = torch.randint(0, vocab, (n, prompt + completion))
attn = torch.ones_like(ids)
token_logprobs(model, ids[:, : prompt + 2], attn[:, : prompt + 2], prompt, chunk_tokens=chunk)[0].sum().backward()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
before = kib("VmRSS")
token_logprobs(model, ids, attn, prompt, chunk_tokens=chunk)[0].sum().backward()
print(before, kib("VmHWM"))
"""


def peak_rise(chunk: int, vocab: int, n: int, prompt: int, completion: int) -> int:
    """Bytes the peak RSS rose by in one forward and backward (in a fresh process, so that nothing
    earlier holds memory). Every block above 64 KiB is its own mapping, returned when freed, so the
    peak is of live tensors, not of what glibc kept."""
    args = [str(a) for a in (chunk, vocab, n, prompt, completion)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env, check=True)
    before, after = (int(x) for x in out.stdout.split())
    return (after - before) * 1024


def test_chunked_peak_memory_is_a_fraction_of_the_full_logits() -> None:
    vocab, n, completion = 50_000, 4, 256
    logits_bytes = n * completion * vocab * 4  # one fp32 (N, C, V) tensor: 205 MB
    full = peak_rise(0, vocab, n, 16, completion)
    chunked = peak_rise(128, vocab, n, 16, completion)
    assert full > logits_bytes  # the full path holds at least the logits and their log-softmax
    assert chunked < 0.6 * full, (chunked, full)


def test_gradient_checkpointing_must_be_true_false_or_auto(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], sent_tasks: list[Any]
) -> None:
    for bad in ("sometimes", 1, "true"):
        body = job_body(files[0])
        body["method"]["reinforcement"]["hyperparameters"] = {"gradient_checkpointing": bad}
        response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "method.reinforcement.hyperparameters.gradient_checkpointing"
        assert f"must be true, false or 'auto', got {bad!r}" in error["message"]
    assert sent_tasks == []
    body = job_body(files[0])
    body["method"]["reinforcement"]["hyperparameters"] = {"gradient_checkpointing": True}
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=body).status_code == 200


def test_gradient_checkpointing_resolves_auto_to_off_and_is_echoed() -> None:
    assert resolve({}, 3).echo()["gradient_checkpointing"] is False
    assert resolve({"gradient_checkpointing": "auto"}, 3).echo()["gradient_checkpointing"] is False
    assert resolve({"gradient_checkpointing": True}, 3).echo()["gradient_checkpointing"] is True


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_on_gives_the_loss_and_gradients_of_off(settings: Settings, lora: bool) -> None:
    """Shared prompts too: the checkpointed layers drop the KV cache, so that path must give way."""
    results = []
    for on in (False, True):
        cfg = resolve({"lora_rank": 4 if lora else 0, "gradient_checkpointing": on}, 3)
        model, _ = build_policy("tiny-random-llama", cfg, settings, "cpu", seed=0)
        assert model.is_activation_checkpointing is on
        ids, attn = rows(model.config.vocab_size, [0, 0, 0, 1, 1, 2])
        logp, _ = token_logprobs(model, ids, attn, PROMPT)
        mask = torch.ones_like(logp)
        adv = torch.linspace(-1, 1, logp.shape[0])
        parts = policy_loss(logp, logp.detach() - 0.1, adv, mask, cfg, float(mask.sum()))
        parts.loss.backward()
        results.append([parts.loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None])
    off, on_ = results
    assert len(off) == len(on_) > 1
    for a, b in zip(on_, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
