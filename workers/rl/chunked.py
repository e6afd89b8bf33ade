"""Log-probs from hidden states, chunk by chunk, so that the (tokens x vocabulary) logits never exist.

With a 151936-token vocabulary (Qwen) the logits are the largest tensor of an update: 16 samples of
1024 tokens make 10 GB of fp32 logits, and the full path keeps them, their log-softmax and, in the
backward pass, their gradient. Here the head runs over a chunk of positions at a time, in both
passes, so the peak is one chunk's logits (`CHUNK_BYTES`), whatever the number of tokens.

A plain linear head (the usual case) goes through `_LinearHeadLogprobs`, whose backward pass
recomputes each chunk and adds its share of the head's gradient into one buffer in place: with
`torch.utils.checkpoint` per chunk, each chunk's (vocabulary x hidden) weight gradient would be a
tensor of its own, added to the others by autograd, and below about `hidden` tokens a chunk's logits
are smaller than that gradient (measured: `bench/memory_chunked.py`). Other heads (LoRA on lm_head, a
hooked head) take the checkpointed path, which calls the module, so whatever it does still applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Model types whose causal-LM head is `lm_head(hidden)`, then at most Gemma's tanh softcap: those the
# chunks reproduce. Others (Cohere's `logit_scale`, Granite's `logits_scaling`, multimodal wrappers)
# keep the full-logits path rather than risk a silently different head.
CHUNKED_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3"}
    | {"smollm3"}
)
# fp32 logits of one chunk; with a 151936-token vocabulary (Qwen) 441 tokens, with 32000 (Llama 2) 2097.
CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class Head:
    """A causal LM split where the largest tensor would appear: body -> hidden states -> logits."""

    body: Any  # the decoder stack, final norm included
    lm_head: Any  # the output projection as a module
    softcap: float | None  # Gemma 2/3's final_logit_softcapping
    vocab: int


def head_of(model: Any) -> Head | None:
    """`model`'s body and head (through PEFT's wrappers, which forward these calls), or None where
    its logits are more than `lm_head(hidden)` and an optional softcap."""
    config = model.config  # a multimodal model's own type, not its text part's: its forward does more
    if config.model_type not in CHUNKED_TYPES:
        return None
    body, lm_head = model.get_decoder(), model.get_output_embeddings()
    if body is None or lm_head is None or body is model:
        return None
    return Head(body, lm_head, getattr(config, "final_logit_softcapping", None), int(config.vocab_size))


def chunked_logprobs(
    head: Head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H) final hidden states predicting (N, C) targets -> (log-probs, entropies), (N, C)
    each, `chunk_tokens` positions at a time (default: `CHUNK_BYTES` of fp32 logits)."""
    size = chunk_tokens or max(1, CHUNK_BYTES // (4 * head.vocab))
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N * C, H), (N * C,)
    lm_head = head.lm_head
    plain = type(lm_head) is torch.nn.Linear and lm_head.bias is None
    if plain and not (lm_head._forward_hooks or lm_head._forward_pre_hooks):
        logp, entropy = _LinearHeadLogprobs.apply(flat, lm_head.weight, flat_targets, head.softcap, size)
        return logp.view_as(targets), entropy.view_as(targets)
    parts = []
    for start in range(0, flat_targets.numel(), size):
        chunk = (head, flat[start : start + size], flat_targets[start : start + size])
        if torch.is_grad_enabled():  # keep only the chunk's inputs; the backward pass recomputes its logits
            parts.append(checkpoint(_module_chunk, *chunk, use_reentrant=False))
        else:
            parts.append(_module_chunk(*chunk))
    return torch.cat([p[0] for p in parts]).view_as(targets), torch.cat([p[1] for p in parts]).view_as(targets)


def completion_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits predicting (...) targets -> (log-probabilities, entropies), (...) each."""
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a diagnostic, never part of the loss
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def _values(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` of (n, V) logits without a graph, holding two (n, V) tensors at once
    instead of four (log-softmax, its exp and their product): log p = logit - logsumexp, entropy =
    logsumexp - sum(p * logit), the sum a batched dot product that makes no (n, V) product."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).sub_(lse).squeeze(-1)
    probs = logits.sub(lse).exp_()
    entropy = lse.squeeze(-1) - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    return logp, entropy


def _module_chunk(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head.lm_head(hidden)  # (n, V)
    if head.softcap is not None:  # as Gemma 2's forward does it, in the logits' dtype
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return completion_logprobs(logits, targets)


class _LinearHeadLogprobs(torch.autograd.Function):
    """log p(target) and entropy under `softcap(hidden @ weight.T)`, in chunks in both passes. The
    matmuls run in autocast's dtype where autocast is on at the forward pass, as `nn.Linear` would."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.softcap, ctx.size = softcap, size
        logp = hidden.new_empty(targets.shape, dtype=torch.float32)  # (n,)
        entropy = torch.empty_like(logp)
        with torch.autocast(device, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, targets.numel(), size):
                logits = _capped(hidden[start : start + size].to(ctx.dtype) @ w.T, softcap)  # (chunk, V)
                part = slice(start, start + size)
                logp[part], entropy[part] = _values(logits, targets[part])
                del logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, _grad_entropy: Any) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None  # the one (V, H) buffer
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, targets.numel(), ctx.size):
                part = slice(start, start + ctx.size)
                h = hidden[part].to(ctx.dtype)  # (chunk, H)
                raw = h @ w.T  # (chunk, V)
                probs = _capped(raw, ctx.softcap).float().softmax(-1)
                grad = probs.mul_(-grad_logp[part, None])  # d logp / d logits = onehot - softmax
                grad.scatter_add_(-1, targets[part, None], grad_logp[part, None])
                if ctx.softcap is not None:  # d(c tanh(x / c)) / dx = 1 - tanh(x / c)^2
                    grad *= 1 - torch.tanh(raw.float() / ctx.softcap) ** 2
                grad = grad.to(ctx.dtype)
                if grad_hidden is not None:
                    grad_hidden[part] = grad @ w
                if grad_weight is not None and grad_weight.dtype == grad.dtype:
                    grad_weight.addmm_(grad.T, h)
                elif grad_weight is not None:  # autocast: a half-precision (V, H) share, added in full
                    grad_weight.add_(grad.T @ h)
        return grad_hidden, grad_weight, None, None, None


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap
