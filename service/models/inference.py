"""Chat generation for `/v1/chat/completions`: a token-by-token loop over the KV cache that yields
text as it is decoded, so the same code serves plain and streamed answers.

The `n` choices of one request are one batch (the prompt repeated, so no padding is needed).
`temperature=0` is greedy decoding; otherwise softmax sampling with nucleus (`top_p`) filtering
(`sampling.pick`, shared with training rollouts), drawn from a generator seeded by `seed` when
given, from logits shaped by `logits.Shaper` (bias, penalties, a constraint). Stop strings end a
choice and are not returned; text that could be the start of a stop string, or half of a UTF-8
character, is held back until it is settled, and so are the log-probabilities of its tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.models.constraints import Constraint
from service.models.templates import eos_ids, render_prompt

if TYPE_CHECKING:
    from service.models.logits import Shaper


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none reported; else how many top alternatives per token
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    constraint: Constraint | None = None


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on a choice's last delta
    completion_tokens: int = 0  # tokens the choice generated (its EOS included), on the last delta
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's entries of the tokens of `text` (with `logprobs`)


@dataclass
class _Choice:
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already yielded
    generated: int = 0
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one per token of `tokens`
    logprobs_sent: int = 0


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    text = render_prompt(tokenizer, messages, tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stream(model: Any, tokenizer: Any, prompt: list[int], params: Params) -> Iterator[list[Delta]]:
    """Yield, after each decoding step, the new text of every choice that has some."""
    import torch  # here, not at import: the API answers job requests without loading torch

    from service.models.logits import logprob_entries
    from service.models.sampling import pick

    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    ends = eos_ids(model, tokenizer)
    choices = [_Choice() for _ in range(params.n)]
    shaper = _shaper(model, tokenizer, params, ends)
    cache: Any = None
    step_input = torch.tensor([prompt] * params.n, device=device)  # (n, P), then (n, 1)
    for _ in range(params.max_tokens):
        # Grad mode is per thread and a streamed answer resumes on any pool thread: set it per step.
        with torch.no_grad():
            out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            raw = out.logits[:, -1, :]  # (n, V)
            next_ids = pick(shaper(raw), params.temperature, params.top_p, generator)  # (n,)
        shaper.advance(next_ids)
        entries = None
        if params.logprobs is not None:
            entries = logprob_entries(raw, next_ids, params.logprobs, tokenizer, ends)
        deltas = []
        for index, (choice, token) in enumerate(zip(choices, next_ids.tolist(), strict=True)):
            if choice.finish_reason is not None:
                continue
            choice.generated += 1
            if token in ends:
                choice.finish_reason = "stop"
            else:
                choice.tokens.append(token)
                if entries is not None:
                    choice.logprobs.append(entries[index])
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


def _shaper(model: Any, tokenizer: Any, params: Params, ends: list[int]) -> Shaper:
    from service.models.logits import Shaper

    vocab = int(model.get_output_embeddings().weight.shape[0])
    return Shaper(
        rows=params.n,
        vocab_size=vocab,
        device=model.device,
        tokenizer=tokenizer,
        end_ids=ends,
        logit_bias=params.logit_bias,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        constraint=params.constraint,
    )


def _advance(index: int, choice: _Choice, tokenizer: Any, stops: tuple[str, ...]) -> Delta | None:
    """The settled text not yet sent (and its tokens' log-probabilities), and the finish reason
    once the choice is over."""
    text = tokenizer.decode(choice.tokens, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    cut = None
    if hits:
        cut = min(hits)
        text, choice.finish_reason = text[:cut], "stop"
    settled = len(text)
    if choice.finish_reason is None:
        settled = len(text.rstrip("\ufffd"))  # half of a multi-byte character
        for stop in stops:  # a suffix that may grow into a stop string
            for size in range(min(len(stop) - 1, settled), 0, -1):
                if text[:settled].endswith(stop[:size]):
                    settled -= size
                    break
    new, choice.sent = text[choice.sent : max(settled, choice.sent)], max(settled, choice.sent)
    logprobs = _settled_logprobs(choice, tokenizer, cut, settled == len(text))
    if new or choice.finish_reason is not None or logprobs:
        done = choice.finish_reason is not None
        return Delta(index, new, choice.finish_reason, choice.generated if done else 0, logprobs)
    return None


def _settled_logprobs(choice: _Choice, tokenizer: Any, cut: int | None, whole: bool) -> list[dict[str, Any]] | None:
    """The entries not yet sent of tokens whose text is settled: all of them when nothing is held
    back; when a stop string cut the text, those of the tokens before it."""
    if not choice.logprobs:
        return None
    upto = len(choice.logprobs) if whole and cut is None else choice.logprobs_sent
    if cut is not None:
        upto = choice.logprobs_sent
        while upto < len(choice.tokens) and len(_text(tokenizer, choice.tokens[: upto + 1])) <= cut:
            upto += 1
    entries, choice.logprobs_sent = choice.logprobs[choice.logprobs_sent : upto], max(upto, choice.logprobs_sent)
    return entries


def _text(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True))
