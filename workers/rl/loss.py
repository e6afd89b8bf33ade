"""The GRPO-family objective.

Advantages are group-relative: A_i = (r_i - mean(r_group)) / std, where std is the group's
(GRPO), the batch's, or 1 (`none`, Dr. GRPO's fix for the std bias). The policy term is PPO's
clipped surrogate with separate `epsilon_low`/`epsilon_high` (DAPO's clip-higher), on per-token
ratios or on one length-normalised sequence ratio (GSPO). The KL to the initial policy uses the
k3 (Schulman) or k1 estimator, per token, weighted by `beta`. Truncated completions are masked out.
Deviation from the papers: one optimisation pass per rollout batch, so the "old" policy is the
current one detached (ratio 1, clipping inactive), as in TRL's default `num_iterations=1`.

Where the sampler is not the trainer (vLLM), the completions come from a slightly different
distribution than the one the trainer scores. Truncated importance sampling (TIS; TRL's
`vllm_importance_sampling_correction`, verl's TIS) multiplies the policy term by the detached
weight min(p_trainer / p_sampler, cap), per token or once per sequence (the product of its tokens'
ratios). The KL term is not weighted, as in TRL. How far apart the two are is measured either way.
Both sides are the models' own distributions at temperature 1 (the sampler reports its log-probs
before temperature, top-p and grammar masks), as the trainer scores at temperature 1: the weight
divides out the engines' difference only. TRL and verl, whose trainers score at the sampling
temperature, compare at that temperature for the same reason. Dividing by the tempered sampler's
log-probs instead would reweight every token by a power of its own probability (at 0.7, likely
tokens down and unlikely ones up to the cap), a bias the torch engine's path does not have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from workers.rl.chunked import Head, chunked_logprobs, completion_logprobs, head_of
from workers.rl.rollout import shared_prefix


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    chunk_tokens: int | None = None,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies (the latter without gradient) of the completion tokens, (N, C).

    With `prefix` (per layer, the keys and values of these rows' prompts but their last token, from
    `PrefixGrads.rows`) only the last prompt token and the completions run. Otherwise rows whose
    prompt equals the previous row's (a group's samples, laid out together) share one prompt pass
    (`rollout.shared_prefix`). The prompt is most of a sequence here, so either way removes about
    half of the forward and backward work, with the same result. Under gradient checkpointing the
    layers drop any KV cache, so there both give way to the plain pass.

    The (N, C, V) logits never exist at once: the head runs over `chunk_tokens` positions at a time
    (`chunked.chunked_logprobs`). `chunk_tokens=0` computes the full logits, as models whose head
    `chunked.head_of` cannot reproduce do.

    `share_prompts=False` takes the plain pass always: one forward per call, whatever the rows, as
    FSDP2 needs of every rank (`ranks.py`).
    """
    head = head_of(model) if chunk_tokens != 0 else None
    targets = input_ids[:, prompt_len:]  # (N, C)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
    replayed = model.training and torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False)
    if prefix is not None and not replayed:
        return _scores(
            model,
            head,
            targets,
            chunk_tokens,
            input_ids=input_ids[:, prompt_len - 1 : -1],  # (N, C): the last prompt token, then completions
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_len - 1 : -1],
            cache=DynamicCache(ddp_cache_data=prefix, config=model.config),
            use_cache=True,
        )
    shared = None if replayed or not share_prompts else shared_prefix(model, input_ids, attention_mask, prompt_len)
    if shared is None:
        return _scores(
            model,
            head,
            targets,
            chunk_tokens,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
        )
    cache, first = shared  # first (N, 1, V) predicts the first completion token
    logp, entropy = completion_logprobs(first, targets[:, :1])
    if targets.shape[1] > 1:
        rest = _scores(
            model,
            head,
            targets[:, 1:],
            chunk_tokens,
            input_ids=input_ids[:, prompt_len:-1],  # (N, C - 1)
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_len:-1],
            cache=cache,
            use_cache=True,
        )
        logp, entropy = torch.cat([logp, rest[0]], dim=1), torch.cat([entropy, rest[1]], dim=1)
    return logp, entropy


def _scores(
    model: Any, head: Head | None, targets: torch.Tensor, chunk_tokens: int | None, **inputs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of `targets` (N, C), predicted by the C positions before the inputs'
    last one, or by all of them where the inputs are only C long (the pass over a cache)."""
    width = targets.shape[1]
    keep = width + 1 if inputs["input_ids"].shape[1] > width else width
    if head is None:
        logits = model(**inputs, logits_to_keep=keep).logits[:, :width]  # (N, C, V)
        return completion_logprobs(logits, targets)
    hidden = head.body(**inputs).last_hidden_state[:, -keep:][:, :width]  # (N, C, H)
    return chunked_logprobs(head, hidden, targets, chunk_tokens)


def advantages(rewards: torch.Tensor, group_size: int, std_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), zero-variance-group flags (B,)) for rewards laid out group by group."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    zero_std = grouped.std(dim=1) < 1e-8  # (B,)
    if std_mode == "group":
        scale = grouped.std(dim=1, keepdim=True)
    elif std_mode == "batch":
        scale = rewards.std().expand_as(centered[:, :1])
    else:
        scale = torch.ones_like(centered[:, :1])
    return (centered / (scale + 1e-4)).reshape(-1), zero_std


@dataclass
class Mismatch:
    """Sums over a micro-batch's loss tokens of how the sampler's log-probs differ from the trainer's."""

    abs_logp_diff: float
    kl: float  # k3 estimate of KL(sampler || trainer), the sampler's tokens being its samples
    capped_tokens: float  # tokens whose importance weight hit the cap (or would, with the correction off)

    def __add__(self, other: Mismatch) -> Mismatch:
        return Mismatch(
            self.abs_logp_diff + other.abs_logp_diff, self.kl + other.kl, self.capped_tokens + other.capped_tokens
        )


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, already divided by the whole batch's normaliser
    kl_sum: float
    clipped_tokens: float
    mismatch: Mismatch | None = None  # None without the sampler's log-probs


def importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights min(p_trainer / p_sampler, cap) and where the cap bit, (N, C)
    each, without gradient: per token, or with `mode` "sequence" one weight per row from the sum
    of its tokens' log-ratios. Clamped in log space, so a long sequence's sum cannot overflow."""
    log_ratio = (trainer_logp.detach() - sampler_logp) * mask  # (N, C)
    if mode == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    capped = (log_ratio > math.log(cap)) & mask.bool()
    return log_ratio.clamp(max=math.log(cap)).exp(), capped


def policy_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: Any,
    normaliser: float,
    sampler_logp: torch.Tensor | None = None,
) -> LossParts:
    """Loss of one micro-batch; `normaliser` is the batch's token count (token_mean) or sequence count.
    `sampler_logp` (N, C), the log-probs the completions were drawn with, brings the mismatch
    measures and, unless `cfg.importance_sampling_correction` is "none", the TIS weights."""
    old = logp.detach()
    if cfg.importance_sampling == "sequence":
        lengths = mask.sum(1).clamp(min=1)
        log_ratio = (((logp - old) * mask).sum(1) / lengths).unsqueeze(1).expand_as(logp)  # (N, C)
    else:
        log_ratio = logp - old
    ratio = log_ratio.exp()
    surrogate = torch.minimum(
        ratio * adv[:, None], ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * adv[:, None]
    )
    per_token = -surrogate  # (N, C)
    mismatch = None
    if sampler_logp is not None:
        mode, cap = cfg.importance_sampling_correction, cfg.importance_sampling_cap
        weights, capped = importance_weights(old, sampler_logp, mask, mode, cap)
        if mode != "none":
            per_token = per_token * weights
        delta = (old - sampler_logp) * mask  # log(p_trainer / p_sampler)
        mismatch = Mismatch(
            float(delta.abs().sum()), float(((delta.exp() - 1 - delta) * mask).sum()), float(capped.sum())
        )
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = delta.exp() - delta - 1 if cfg.kl_estimator == "k3" else -delta
        per_token = per_token + cfg.beta * kl
    if cfg.loss_aggregation == "token_mean":
        loss = (per_token * mask).sum() / normaliser
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    clipped = ((ratio < 1 - cfg.epsilon_low) | (ratio > 1 + cfg.epsilon_high)).float() * mask
    return LossParts(loss, float((kl.detach() * mask).sum()), float(clipped.sum()), mismatch)
