"""Holding sampling to a `constraints.Constraint`: llguidance's token masks over the logits.

One `Guide` follows a batch of rows, a matcher each. Before every draw `mask_` sets the logits of
tokens the grammar does not allow next to -inf; after it, `advance` feeds each row's token to its
matcher. Where the grammar is complete, only the model's end ids are allowed, so the row ends
(`finish_reason` "stop"). A row whose matcher failed (which the masks should make impossible) may
only end. Temperature, top_p and greedy decoding then work on what is left, unchanged.

The masks cost CPU time per token (`bench/constrained_decoding.py` measures it). The trainer scores
a constrained completion's tokens under the unconstrained policy, as trl does with vLLM's guided
decoding: the mask decides what may be drawn, not what the policy is.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.models.constraints import Constraint

_tokenizers: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Any, vocab_size: int, end_ids: Sequence[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (about a second for a 50k vocabulary; cached)."""
    import llguidance.hf

    key = (vocab_size, tuple(end_ids))
    known = _tokenizers.setdefault(tokenizer, {})
    if key not in known:
        known[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(end_ids))
    return known[key]


def token_bytes(tokenizer: Any, vocab_size: int, end_ids: Sequence[int], ids: Sequence[int]) -> list[bytes]:
    """Each token's own bytes (a piece of a multi-byte character is its bytes, not a replacement character)."""
    ll = ll_tokenizer(tokenizer, vocab_size, end_ids)
    return [ll.decode_bytes([i]) for i in ids]


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool, shared by every guide of the process."""
    from llguidance import LLExecutor

    return LLExecutor()


class Guide:
    def __init__(
        self, constraint: Constraint, tokenizer: Any, rows: int, vocab_size: int, end_ids: Sequence[int]
    ) -> None:
        from llguidance import LLMatcher

        ll = ll_tokenizer(tokenizer, vocab_size, end_ids)
        grammar = constraint.grammar()
        self.matchers = [LLMatcher(ll, grammar, log_level=0) for _ in range(rows)]
        if self.matchers and self.matchers[0].is_error():
            raise ValueError(f"grammar refused: {self.matchers[0].get_error()}")
        self.end_ids = torch.tensor(list(end_ids), dtype=torch.long)
        self.ended = [False] * rows
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32

    def allowed(self) -> np.ndarray:
        """(rows, V) bool: the tokens each row's grammar allows next."""
        rows = len(self.matchers)
        bitmask = np.zeros((rows, self.words), dtype=np.int32)  # (rows, ceil(V / 32))
        pairs = [(m, i) for i, m in enumerate(self.matchers)]
        _executor().unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, self.words * 4, rows)
        # Bit k of a row's little-endian bytes is token k. All in numpy: torch's shifts, casts and
        # reductions over (rows, V) cost tens of ms a step here (thread start-up), numpy's 0.1 ms.
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].view(bool)
        stuck = ~allowed.any(axis=1)  # (rows,)
        if stuck.any():
            allowed[np.ix_(np.flatnonzero(stuck), self.end_ids.numpy())] = True
        return allowed

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, V) logits, those of tokens the grammar forbids set to -inf (in place)."""
        forbidden = torch.from_numpy(~self.allowed()[:, : logits.shape[-1]]).to(logits.device)
        return logits.masked_fill_(forbidden, float("-inf"))

    def advance(self, tokens: Sequence[int]) -> None:
        """Feed each row its drawn token; a row that drew an end id is over."""
        ends = set(self.end_ids.tolist())
        for i, (matcher, token) in enumerate(zip(self.matchers, tokens, strict=True)):
            if self.ended[i]:
                continue
            if token in ends:
                self.ended[i] = True
            else:
                matcher.consume_token(int(token))


class GuideProcessor:
    """A `Guide` as a transformers logits processor, for `model.generate` (the API's model graders)."""

    def __init__(self, guide: Guide, prompt_len: int) -> None:
        self.guide, self.prompt_len = guide, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_len:
            self.guide.advance(input_ids[:, -1].tolist())
        return self.guide.mask_(scores)
