"""Tiny randomly initialised model configs of any transformers family, for tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers

# Converted model weights (the dequantized GGUF) kept across test runs: tests pass it as a data dir.
MODEL_CACHE = Path(os.environ.get("RFT_TEST_MODEL_CACHE", Path(__file__).parents[2] / ".cache" / "test-models"))

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


# A chat template with Qwen3's thinking switch (the part that matters here), over ChatML.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>"


def save_thinking_model(folder: Path) -> Path:
    """`tiny-random-llama` saved as a Hugging Face folder whose chat template has the thinking switch."""
    from service.models.registry import tiny_llama

    model, tokenizer = tiny_llama()
    tokenizer.chat_template = THINKING_TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
