"""Sampling completions with the KV cache (our own decode loop), as padded tensors.

Prompts are left-padded so every completion starts at the same column; completions are cut at the
first EOS, any of the model's end ids (`templates.eos_ids`; kept, so the model learns to stop), and
right-padded. A completion that hit `max_completion_tokens` without EOS is marked truncated and
masked out of the loss. Each chosen token's log-probability under the model's own distribution
(temperature 1, no nucleus or grammar mask) comes back too, so that the update can compare the
sampler with the trainer (`loss.Mismatch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.models.constraints import Constraint
from service.models.guided import Guide
from service.models.sampling import draw
from service.models.templates import eos_ids, render_prompt
from workers.rl.state import derive_seed


@dataclass
class Prefix:
    """The policy's pass over each distinct prompt but its last token, as sampling ran it, autograd
    graph included: per layer, keys and values (U, heads, P - 1, head dim), and each row's prompt (N,).

    The weights do not change between sampling and the optimizer step, so the update runs the
    completions over these keys and values instead of running the prompts again, and sends their
    gradients back through this one pass at the end (`PrefixGrads`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    owner: torch.Tensor  # (N,) row -> index into the U distinct prompts


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + C) prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C) 1 on completion tokens (through EOS)
    prompt_len: int
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool
    prefix: Prefix | None = None  # sampling's prompt pass, kept for the update (`sample(keep_prefix=True)`)
    # (N, C) the sampler's log-prob of each completion token, 0 on padding, under its model's own
    # distribution: softmax(logits) at temperature 1, before temperature, top_p and grammar masks
    # shape what is drawn. That is what the trainer scores, so the two differ by the engines alone
    # (none with the torch engine, rounding and kernels with vLLM), not by the sampling settings.
    sampler_logprobs: torch.Tensor | None = None
    finish_reasons: list[str] = field(default_factory=list)  # per row, "stop" (EOS) or "length"

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
    first: int = 0,
    greedy: bool = False,
    keep_prefix: bool = False,
    tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    constraint: Constraint | None = None,
) -> Rollout:
    """`n_per_prompt` completions of each conversation (rendered with its function `tools`, where
    given), laid out prompt by prompt, held to `constraint` where given. Conversation i draws its
    tokens from `derive_seed(seed, first + i)` alone (`RowUniforms`), so a batch split into parts
    (across ranks) samples what it would whole. With `keep_prefix` the prompt pass runs with
    autograd on and comes back as `Rollout.prefix`, for the update."""
    listed = tools if tools is not None else [None] * len(conversations)
    prompts = [render_prompt(tokenizer, c, t) for c, t in zip(conversations, listed, strict=True)]
    prompts = [p for p in prompts for _ in range(n_per_prompt)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    stops = torch.tensor(eos_ids(model, tokenizer), device=model.device)
    guide = None
    if constraint is not None:
        vocab = int(model.get_output_embeddings().weight.shape[0])
        guide = Guide(constraint, tokenizer, len(prompts), vocab, stops.tolist())
    completions, logprobs, prefix = decode(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=top_p,
        uniforms=RowUniforms([derive_seed(seed, first + i) for i in range(len(conversations))], n_per_prompt),
        eos_ids=stops,
        pad_id=tokenizer.pad_token_id,
        keep_prefix=keep_prefix,
        guide=guide,
    )  # (N, C')
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    is_eos = torch.isin(completions, stops)
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
        prefix=prefix,
        sampler_logprobs=logprobs * completion_mask,
        finish_reasons=["stop" if eos else "length" for eos in has_eos.tolist()],
    )


def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    uniforms: RowUniforms,
    eos_ids: torch.Tensor,
    pad_id: int,
    keep_prefix: bool = False,
    guide: Guide | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Prefix | None]:
    """Up to `max_new_tokens` tokens for each left-padded row, (N, C'): pad after a row's first
    end id (any of `eos_ids`), and C' < max_new_tokens when every row has ended; their
    log-probabilities under softmax(logits) (N, C'), 0 on the padding (see `Rollout.sampler_logprobs`);
    and the prompt pass when `keep_prefix` asks for it.

    The prompts go through `prefix_pass` (each distinct prompt once, all but its last token), then
    one token per row per step over the KV cache. Tokens are drawn by `service.models.sampling.draw`
    with each row's next number from `uniforms`, so the same seeds give the same tokens; a `guide`
    masks the logits to what its grammar allows first.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P)
    prompt_len = input_ids.shape[1]
    cache, step_ids, step_positions, prefix = None, input_ids, positions, None
    if prompt_len > 1:
        with torch.set_grad_enabled(keep_prefix):
            found = prefix_pass(model, input_ids, attention_mask, prompt_len - 1, always=keep_prefix)
        if found is not None:
            cache, owner, _ = found
            if keep_prefix:
                prefix = Prefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], owner)
            cache.batch_select_indices(owner)  # new tensors for the decode; the prefix keeps its own
            step_ids, step_positions = input_ids[:, -1:], positions[:, -1:]
    mask, ended, tokens = attention_mask, torch.zeros_like(input_ids[:, 0], dtype=torch.bool), []
    logprobs: list[torch.Tensor] = []
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
        raw = out.logits[:, -1]  # (N, V)
        logits = raw if guide is None else guide.mask_(raw.float().clone())
        chosen, logp = draw(logits, temperature, top_p, None, uniforms.next())  # (N,) each
        if temperature != 1.0 or top_p < 1.0 or guide is not None:  # else draw's log-probs are these
            logp = torch.log_softmax(raw.float(), dim=-1).gather(-1, chosen.unsqueeze(1)).squeeze(1)
        chosen = torch.where(ended, torch.full_like(chosen, pad_id), chosen)
        if guide is not None:
            guide.advance(chosen.tolist())
        tokens.append(chosen)
        logprobs.append(torch.where(ended, torch.zeros_like(logp), logp))
        ended |= torch.isin(chosen, eos_ids)
        if bool(ended.all()):
            break
        step_ids, step_positions = chosen.unsqueeze(1), step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if not tokens:
        return input_ids[:, :0], input_ids[:, :0].float(), prefix
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), prefix


class RowUniforms:
    """The uniform numbers each row's draws invert, step after step: prompt i's `n` rows take theirs
    from a generator of its own seeded with `seeds[i]`, so a row's numbers do not depend on which
    other prompts share its batch. Drawn on the CPU (the same numbers on any device), a block of
    steps at a time."""

    BLOCK = 32

    def __init__(self, seeds: list[int], n: int) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.n, self.step, self.block = n, 0, torch.empty(0, 0)

    def next(self) -> torch.Tensor:
        """(prompts * n,) the numbers of the next step."""
        if self.step % self.BLOCK == 0:  # (BLOCK, prompts * n)
            self.block = torch.cat([torch.rand(self.BLOCK, self.n, generator=g) for g in self.generators], dim=1)
        row = self.block[self.step % self.BLOCK]
        self.step += 1
        return row


def prefix_pass(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int, always: bool = False
) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
    """One model pass over each distinct prefix `[:length]` (rows equal to the previous row's share
    it, as a group's samples do): (its KV cache (U rows), the prefix each row belongs to (N,), the
    logits at each prefix's last position (U, 1, V)). None, unless `always`, when no two
    neighbouring rows share a prefix (the plain pass then costs the same)."""
    firsts, owner = prompt_owners(input_ids, attention_mask, length)
    if len(firsts) == input_ids.shape[0] and not always:
        return None
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T), left padding
    out = model(
        input_ids=input_ids[firsts, :length],  # (U, length)
        attention_mask=attention_mask[firsts, :length],
        position_ids=positions[firsts, :length],
        use_cache=True,
        logits_to_keep=1,
    )
    return out.cache, owner, out.logits


def shared_prefix(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
) -> tuple[Any, torch.Tensor] | None:
    """`prefix_pass` with its KV cache repeated for each row: (cache, each row's logits at the
    prefix's last position (N, 1, V)), or None.

    The update runs each prompt once and its completions over the cache (when sampling's pass is
    not kept); sampling prefills all but the last prompt token this way. Both give the same
    tokens, log-probs and gradients as the plain pass (tested); gradients of every row flow into
    the one prefix pass.
    """
    found = prefix_pass(model, input_ids, attention_mask, length)
    if found is None:
        return None
    cache, owner, logits = found
    cache.batch_select_indices(owner)  # (U, ...) -> (N, ...), differentiable
    return cache, logits[owner, -1:]


class PrefixGrads:
    """Leaves that stand in for a `Prefix` during the update. Each micro-batch takes its rows' keys
    and values from them and their gradients add up; `backward()` then sends the sum through the
    prompt pass once. By linearity that is the gradient of running the prompts in every micro-batch."""

    def __init__(self, prefix: Prefix) -> None:
        self.prefix = prefix
        self.keys = [k.detach().requires_grad_(k.requires_grad) for k in prefix.keys]
        self.values = [v.detach().requires_grad_(v.requires_grad) for v in prefix.values]

    def rows(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of these rows' prompts, (n, heads, P - 1, head dim) each."""
        owner = self.prefix.owner[rows]
        return [(k[owner], v[owner]) for k, v in zip(self.keys, self.values, strict=True)]

    def backward(self) -> None:
        pairs = [
            (kept, leaf.grad)
            for kept, leaf in zip(self.prefix.keys + self.prefix.values, self.keys + self.values, strict=True)
            if leaf.grad is not None and kept.requires_grad
        ]
        if pairs:
            torch.autograd.backward([kept for kept, _ in pairs], [grad for _, grad in pairs])


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
        None
        if rollout.prefix is None
        else Prefix(rollout.prefix.keys, rollout.prefix.values, rollout.prefix.owner[index]),
        None if rollout.sampler_logprobs is None else rollout.sampler_logprobs[index],
        [rollout.finish_reasons[i] for i in rows] if rollout.finish_reasons else [],
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

    def pad_logprobs(r: Rollout) -> torch.Tensor | None:
        right = completion_len - r.completion_mask.shape[1]
        return None if r.sampler_logprobs is None else torch.nn.functional.pad(r.sampler_logprobs, (0, right))

    (ia, aa, ca), (ib, ab, cb) = pad(a), pad(b)
    la, lb = pad_logprobs(a), pad_logprobs(b)
    return Rollout(
        torch.cat([ia, ib]),
        torch.cat([aa, ab]),
        torch.cat([ca, cb]),
        prompt_len,
        a.texts + b.texts,
        torch.cat([a.truncated, b.truncated]),
        concat_prefixes(a, b, prompt_len),
        None if la is None or lb is None else torch.cat([la, lb]),
        a.finish_reasons + b.finish_reasons,
    )


def concat_prefixes(a: Rollout, b: Rollout, prompt_len: int) -> Prefix | None:
    """Both prompt passes, keys and values left-padded with zeros to the new prompt length like the
    prompts (the attention mask hides them; positions come from the mask, so nothing else moves)."""
    if a.prefix is None or b.prefix is None:
        return None

    def pad(tensors: list[torch.Tensor], r: Rollout) -> list[torch.Tensor]:
        return [torch.nn.functional.pad(t, (0, 0, prompt_len - r.prompt_len, 0)) for t in tensors]

    return Prefix(
        [torch.cat(kv) for kv in zip(pad(a.prefix.keys, a), pad(b.prefix.keys, b), strict=True)],
        [torch.cat(kv) for kv in zip(pad(a.prefix.values, a), pad(b.prefix.values, b), strict=True)],
        torch.cat([a.prefix.owner, b.prefix.owner + a.prefix.keys[0].shape[0]]),
    )
