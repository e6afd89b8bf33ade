"""Sampling completions with the KV cache (our own decode loop), as padded tensors.

Prompts are left-padded so every completion starts at the same column; completions are cut at the
first EOS (kept, so the model learns to stop) and right-padded. A completion that hit
`max_completion_tokens` without EOS is marked truncated and masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from service.models.sampling import pick


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + C) prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C) 1 on completion tokens (through EOS)
    prompt_len: int
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    n_per_prompt: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    greedy: bool = False,
) -> Rollout:
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompts = [p for p in prompts for _ in range(n_per_prompt)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    completions = decode(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=top_p,
        seed=seed,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )  # (N, C')
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    is_eos = completions == tokenizer.eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(
        has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, completions.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completions.shape[1], device=completions.device).expand_as(completions)
    completion_mask = (positions <= first_eos.unsqueeze(1)).long()  # through the EOS
    completion_mask &= (positions < completions.shape[1]).long()
    completions = torch.where(completion_mask.bool(), completions, torch.full_like(completions, tokenizer.pad_token_id))
    texts = [
        tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
        for row, mask in zip(completions, completion_mask, strict=True)
    ]
    return Rollout(
        input_ids=torch.cat([enc["input_ids"], completions], dim=1),
        attention_mask=torch.cat([enc["attention_mask"], completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_len=prompt_len,
        texts=texts,
        truncated=~has_eos,
    )


def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    eos_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Up to `max_new_tokens` tokens for each left-padded row, (N, C'): pad after a row's EOS, and
    C' < max_new_tokens when every row has ended.

    The prompts go through `shared_prefix` (each distinct prompt once, all but its last token), then
    one token per row per step over the KV cache. Tokens are drawn by `service.models.sampling.pick`
    from a generator seeded with `seed`, so the same seed gives the same tokens.
    """
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P)
    prompt_len = input_ids.shape[1]
    shared = shared_prefix(model, input_ids, attention_mask, prompt_len - 1) if prompt_len > 1 else None
    cache, step_ids, step_positions = None, input_ids, positions
    if shared is not None:
        cache, step_ids, step_positions = shared[0], input_ids[:, -1:], positions[:, -1:]
    mask, ended, tokens = attention_mask, torch.zeros_like(input_ids[:, 0], dtype=torch.bool), []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache
        chosen = pick(out.logits[:, -1], temperature, top_p, generator)  # (N,)
        chosen = torch.where(ended, torch.full_like(chosen, pad_id), chosen)
        tokens.append(chosen)
        ended |= chosen == eos_id
        if bool(ended.all()):
            break
        step_ids, step_positions = chosen.unsqueeze(1), step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if not tokens:
        return input_ids[:, :0]
    return torch.stack(tokens, dim=1)


def shared_prefix(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
) -> tuple[Any, torch.Tensor] | None:
    """One model pass over each distinct prefix `[:length]` (rows equal to the previous row's share
    it, as a group's samples do), its KV cache repeated for its rows: (cache, each row's logits at
    the prefix's last position (N, 1, V)); None when no two neighbouring rows share a prefix.

    Sampling gives `generate` the cache of all but the last prompt token, so it prefills one token
    per row; the update runs each prompt once and its completions over the cache. Both give the
    same tokens, log-probs and gradients as the plain pass (tested); gradients of every row flow
    into the one prefix pass.
    """
    firsts, owner = prompt_owners(input_ids, attention_mask, length)
    if len(firsts) == input_ids.shape[0]:
        return None
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T), left padding
    out = model(
        input_ids=input_ids[firsts, :length],  # (U, length)
        attention_mask=attention_mask[firsts, :length],
        position_ids=positions[firsts, :length],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    cache.batch_select_indices(owner)  # (U, ...) -> (N, ...), differentiable
    return cache, out.logits[owner, -1:]


def prompt_owners(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that start a run of equal prefixes (U,), the run each row belongs to (N,))."""
    ids, mask = input_ids[:, :length], attention_mask[:, :length]
    same = ((ids[1:] == ids[:-1]) & (mask[1:] == mask[:-1])).all(dim=1)  # (N - 1,)
    new_run = torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device), ~same])  # (N,)
    return new_run.nonzero().flatten(), new_run.long().cumsum(0) - 1


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    index = torch.tensor(rows, dtype=torch.long, device=rollout.input_ids.device)
    return Rollout(
        rollout.input_ids[index],
        rollout.attention_mask[index],
        rollout.completion_mask[index],
        rollout.prompt_len,
        [rollout.texts[i] for i in rows],
        rollout.truncated[index],
    )


def concat(a: Rollout, b: Rollout, pad_id: int) -> Rollout:
    """Stack two rollouts, re-padding prompts on the left and completions on the right."""
    prompt_len = max(a.prompt_len, b.prompt_len)
    completion_len = max(a.completion_mask.shape[1], b.completion_mask.shape[1])

    def pad(r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        left, right = prompt_len - r.prompt_len, completion_len - r.completion_mask.shape[1]
        ids = torch.nn.functional.pad(r.input_ids, (left, right), value=pad_id)
        attn = torch.nn.functional.pad(r.attention_mask, (left, right), value=0)
        return ids, attn, torch.nn.functional.pad(r.completion_mask, (0, right), value=0)

    (ia, aa, ca), (ib, ab, cb) = pad(a), pad(b)
    return Rollout(
        torch.cat([ia, ib]),
        torch.cat([aa, ab]),
        torch.cat([ca, cb]),
        prompt_len,
        a.texts + b.texts,
        torch.cat([a.truncated, b.truncated]),
    )
