"""Function tools: checking OpenAI's tool definitions, and reading tool calls out of a completion.

The definitions reach the model through its chat template (`templates.render_prompt(tools=...)`),
so only a model whose template renders `tools` can call them (`supports_tools`). A completion
is read as tool calls in either of two forms, the ones open chat templates teach:

- Hermes / Qwen: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, one block per call;
  text outside the blocks is the message's `content`.
- plain JSON: the whole completion is `{"name": "f", "arguments": {...}}` (Llama 3.1's templates
  say `parameters` for `arguments`; both are read), or a list of such objects.

A call must name one of the request's tools and carry an object of arguments; anything else stays
text. Chat and RFT rollouts use this one parser, so a grader's `sample.output_tools` is what chat's
`message.tool_calls` would be. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from service.models.constraints import NAME

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tools_problem(tools: Any) -> str | None:
    """What is wrong with a `tools` list (OpenAI's function tool shape), or None."""
    if not isinstance(tools, list):
        return 'tools must be a list of tool definitions, {"type": "function", "function": {...}} each'
    if not tools:
        return "tools must not be empty (leave it out for no tools)"
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            return f"{where}.type must be 'function' (the only kind of tool served here), got {kind!r}"
        if set(tool) - {"type", "function"}:
            return f"{where} has unknown key(s): {', '.join(sorted(set(tool) - {'type', 'function'}))}"
        function = tool.get("function")
        if not isinstance(function, dict):
            return f"{where}.function must be an object with a 'name'"
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            return f"{where}.function has unknown key(s): {', '.join(sorted(unknown))}"
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            return f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}"
        if name in names:
            return f"{where}.function.name {name!r} is defined twice"
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            return f"{where}.function.description must be a string"
        parameters = function.get("parameters")
        is_object = isinstance(parameters, dict) and parameters.get("type", "object") == "object"
        if parameters is not None and not is_object:
            return f"{where}.function.parameters must be a JSON schema of type 'object'"
        if "strict" in function and not isinstance(function["strict"], bool | None):
            return f"{where}.function.strict must be true or false"
    return None


def function_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(tool["function"]["name"]) for tool in tools]


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, list[dict[str, Any]]]:
    """(the content left outside tool calls, the calls in OpenAI's `tool_calls` shape). Without
    `tools`, or when nothing parses as a call of one of them, the text is all content."""
    if not tools:
        return text, []
    names = set(function_names(tools))
    blocks = list(TAGGED.finditer(text))
    if blocks:
        calls = [_call(block.group(1), names) for block in blocks]
        if all(call is not None for call in calls):
            return TAGGED.sub("", text).strip(), [c for c in calls if c is not None]
        return text, []
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            return text, []
        many = parsed if isinstance(parsed, list) else [parsed]
        calls = [_call_of(obj, names) for obj in many]
        if many and all(call is not None for call in calls):
            return "", [c for c in calls if c is not None]
    return text, []


def _call(body: str, names: set[str]) -> dict[str, Any] | None:
    try:
        return _call_of(json.loads(body), names)
    except ValueError:
        return None


def _call_of(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_support", "parameters": {"type": "object"}}}


def supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` (a template that ignores them would hide
    the functions from the model): the same turn rendered with and without a tool differs."""
    from service.models.templates import render_prompt

    turn = [{"role": "user", "content": "hi"}]
    try:
        return render_prompt(tokenizer, turn, tools=[PROBE_TOOL]) != render_prompt(tokenizer, turn)
    except Exception:  # a template that fails on tools does not support them either
        return False


def tagged_calls(prompt: str) -> bool:
    """Whether the rendered prompt teaches Hermes-style `<tool_call>` blocks (else calls are bare JSON)."""
    return "<tool_call>" in prompt
