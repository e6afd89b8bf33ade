"""What chat does to a step's logits before the draw, and the log-probabilities it reports.

Before the draw (`Shaper`), in OpenAI's order: `logit_bias` is added; `frequency_penalty` times
each token's count so far and `presence_penalty` once per token already present are subtracted
(OpenAI's documented formula); then the constraint (`guided.Guide`), if any, leaves only the tokens
its grammar allows. Temperature and `top_p` apply to the result (`sampling.pick`).

`logprobs` are the model's own: log_softmax of the raw logits, before any of the above and before
temperature (what vLLM reports by default), for the chosen token and the `top_logprobs` likeliest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from service.models.constraints import Constraint
from service.models.guided import Guide, token_bytes


class Shaper:
    def __init__(
        self,
        *,
        rows: int,
        vocab_size: int,
        device: Any,
        tokenizer: Any,
        end_ids: Sequence[int],
        logit_bias: Mapping[int, float] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        constraint: Constraint | None = None,
    ) -> None:
        self.bias: torch.Tensor | None = None
        if logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)  # (V,)
            ids = torch.tensor(list(logit_bias), device=device)
            self.bias[ids] = torch.tensor(list(logit_bias.values()), device=device, dtype=torch.float32)
        self.frequency, self.presence = frequency_penalty, presence_penalty
        self.counts = torch.zeros((rows, vocab_size), device=device) if frequency_penalty or presence_penalty else None
        self.guide = Guide(constraint, tokenizer, rows, vocab_size, end_ids) if constraint is not None else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) raw logits -> (n, V) the logits to draw from (a new tensor)."""
        shaped = logits.float().clone()
        if self.bias is not None:
            shaped += self.bias
        if self.counts is not None:
            shaped -= self.frequency * self.counts + self.presence * (self.counts > 0).float()
        if self.guide is not None:
            self.guide.mask_(shaped)
        return shaped

    def advance(self, chosen: torch.Tensor) -> None:
        """(n,) the drawn tokens."""
        if self.counts is not None:
            self.counts[torch.arange(len(chosen)), chosen] += 1
        if self.guide is not None:
            self.guide.advance(chosen.tolist())


def logprob_entries(
    logits: torch.Tensor, chosen: torch.Tensor, top: int, tokenizer: Any, end_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Per row, OpenAI's `{token, logprob, bytes, top_logprobs}` for the chosen token of (n, V) raw logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    mine = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()  # (n,)
    best = logp.topk(top, dim=-1) if top else None
    vocab = logits.shape[-1]
    entries = []
    for row, token in enumerate(chosen.tolist()):
        alternatives = []
        if best is not None:
            ids = best.indices[row].tolist()
            pieces = token_bytes(tokenizer, vocab, end_ids, ids)
            alternatives = [_entry(p, v) for p, v in zip(pieces, best.values[row].tolist(), strict=True)]
        (piece,) = token_bytes(tokenizer, vocab, end_ids, [token])
        entries.append({**_entry(piece, mine[row]), "top_logprobs": alternatives})
    return entries


def _entry(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(piece)}
