"""Tiny randomly initialised model configs of any transformers family, for tests."""

from __future__ import annotations

from typing import Any

import transformers

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """`transformers.<family>` (say "Gemma2Config") at a test's size: 2 layers of width 32."""
    return getattr(transformers, family)(vocab_size=vocab_size, **(SMALL | overrides))
