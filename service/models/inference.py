"""Chat generation for `/v1/chat/completions`: a token-by-token loop over the KV cache that yields
text as it is decoded, so the same code serves plain and streamed answers.

The `n` choices of one request are one batch (the prompt repeated, so no padding is needed).
`temperature=0` is greedy decoding; otherwise softmax sampling with nucleus (`top_p`) filtering
(`sampling.pick`, shared with training rollouts), drawn from a generator seeded by `seed` when
given. Stop strings end a choice and are not returned; text that could be the start of a stop
string, or half of a UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.models.templates import eos_ids, render_prompt


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on a choice's last delta
    completion_tokens: int = 0  # tokens the choice generated (its EOS included), on the last delta


@dataclass
class _Choice:
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already yielded
    generated: int = 0
    finish_reason: str | None = None


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = render_prompt(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stream(model: Any, tokenizer: Any, prompt: list[int], params: Params) -> Iterator[list[Delta]]:
    """Yield, after each decoding step, the new text of every choice that has some."""
    import torch  # here, not at import: the API answers job requests without loading torch

    from service.models.sampling import pick

    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    eos = set(eos_ids(model, tokenizer))
    choices = [_Choice() for _ in range(params.n)]
    cache: Any = None
    step_input = torch.tensor([prompt] * params.n, device=device)  # (n, P), then (n, 1)
    for _ in range(params.max_tokens):
        # Grad mode is per thread and a streamed answer resumes on any pool thread: set it per step.
        with torch.no_grad():
            out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            next_ids = pick(out.logits[:, -1, :], params.temperature, params.top_p, generator)  # (n,)
        deltas = []
        for index, (choice, token) in enumerate(zip(choices, next_ids.tolist(), strict=True)):
            if choice.finish_reason is not None:
                continue
            choice.tokens.append(token)
            choice.generated += 1
            if token in eos:
                choice.tokens.pop()
                choice.finish_reason = "stop"
            if delta := _advance(index, choice, tokenizer, params.stop):
                deltas.append(delta)
        if deltas:
            yield deltas
        if all(c.finish_reason is not None for c in choices):
            return
        step_input = next_ids.unsqueeze(1)
    last = []
    for index, choice in enumerate(choices):
        if choice.finish_reason is None:
            choice.finish_reason = "length"
            last.append(_advance(index, choice, tokenizer, params.stop) or Delta(index, "", "length", choice.generated))
    if last:
        yield last


def _advance(index: int, choice: _Choice, tokenizer: Any, stops: tuple[str, ...]) -> Delta | None:
    """The settled text not yet sent, and the finish reason once the choice is over."""
    text = tokenizer.decode(choice.tokens, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        text, choice.finish_reason = text[: min(hits)], "stop"
    settled = len(text)
    if choice.finish_reason is None:
        settled = len(text.rstrip("\ufffd"))  # half of a multi-byte character
        for stop in stops:  # a suffix that may grow into a stop string
            for size in range(min(len(stop) - 1, settled), 0, -1):
                if text[:settled].endswith(stop[:size]):
                    settled -= size
                    break
    new, choice.sent = text[choice.sent : max(settled, choice.sent)], max(settled, choice.sent)
    if new or choice.finish_reason is not None:
        return Delta(index, new, choice.finish_reason, choice.generated if choice.finish_reason else 0)
    return None
