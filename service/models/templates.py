"""From OpenAI-shaped messages to a model's prompt, and the ids that end its turn: one place for
chat, training rollouts and model graders, since a model trained on one rendering and served with
another, or stopped at another id, is not the model that was trained.

Llama-3 and Gemma tokenizers name one end id (`<|end_of_text|>`, `<eos>`) while their instruct
models end a turn with another (`<|eot_id|>`, `<end_of_turn>`) that only
`generation_config.eos_token_id` lists; stopping at the tokenizer's alone runs every completion to
the length limit, where training masks it out as truncated.

Importing this module is cheap (the API renders prompts without loading torch).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from service.core.errors import InvalidRequest


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: `developer` (OpenAI's newer name for the system
    turn, which no open template knows) becomes `system`, and a list of content parts becomes its
    text parts joined. Other keys (`tool_calls`, ...) pass through for templates that read them."""
    out = []
    for message in messages:
        role = message.get("role")
        turn = {**message, "role": "system" if role == "developer" else role, "content": text_of(message)}
        if message.get("tool_calls"):
            turn["tool_calls"] = [_with_parsed_arguments(call) for call in message["tool_calls"]]
        out.append(turn)
    return out


def _with_parsed_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI sends a call's arguments as a JSON string; templates write them with `tojson`, which
    would quote the string again. They get the object (as vLLM hands them)."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets the text as it was sent
            function["arguments"] = json.loads(function["arguments"])
    return {**call, "function": function}


def text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def render_prompt(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The prompt text of `messages` (and the function `tools` the model may call, for templates
    that render them), ending with the assistant's turn header.

    A template that refuses a system turn (Gemma 1 and 2 raise on one) gets the system text in
    front of the first user turn instead, as Gemma 3's own template does. A template that refuses
    the messages anyway is a 400 naming the template's reason."""
    from jinja2.exceptions import TemplateError

    turns = template_messages(messages)
    extra = {"tools": [dict(t) for t in tools]} if tools else {}
    try:
        return str(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False, **extra))
    except TemplateError as first:
        if not any(t["role"] == "system" for t in turns):
            raise _refused(first) from first
        try:
            folded = _system_folded(turns)
            return str(tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=False, **extra))
        except TemplateError:
            raise _refused(first) from first


def _system_folded(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
    rest = [dict(t) for t in turns if t["role"] != "system"]
    first_user = next((t for t in rest if t["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def _refused(error: Exception) -> InvalidRequest:
    return InvalidRequest(f"The model's chat template refuses these messages: {error}", param="messages")


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, then those of the model's
    `generation_config` (an int or a list), each once."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *listed] if i is not None))
