"""How one chat request uses its `tools`: what the template renders, whether the answer is read
as tool calls, and which calls a `tool_choice` forces (a grammar, so even a weak model calls).

- `none`: the tools are rendered (the conversation may mention them) but the answer stays text.
- `auto` (the default with tools): the answer is read as calls where it is one (`tools.parse_tool_calls`).
- `required`: sampling is held to one or more calls of any of the tools (`parallel_tool_calls`
  false: exactly one); `{"type": "function", "function": {"name": ...}}`: exactly one call of it.

A forced call is written the way the rendered prompt teaches: Hermes `<tool_call>` blocks when the
prompt mentions them, else the bare JSON object. With `parallel_tool_calls` false only the first
call of an `auto` answer is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from service.core.errors import InvalidRequest
from service.models import constraints
from service.models.schemas import ChatCompletionCreate
from service.models.tools import function_names, parse_tool_calls, supports_tools, tagged_calls


@dataclass(frozen=True)
class ToolPlan:
    rendered: list[dict[str, Any]] | None = None  # the tools the template shows the model
    parsing: bool = False  # the answer is read as tool calls
    forced: tuple[str, ...] = ()  # the functions sampling is held to calling
    several: bool = True  # more than one call allowed
    constraint: constraints.Constraint | None = None

    def for_prompt(self, prompt: str) -> ToolPlan:
        """The plan once the prompt is rendered: a forced call's grammar in the prompt's style."""
        if not self.forced or self.rendered is None:
            return self
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.rendered}
        calls = [(name, schemas[name]) for name in self.forced]
        grammar = constraints.for_tool_calls(calls, tagged_calls(prompt), several=self.several, param="tools")
        return replace(self, constraint=grammar)

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if not self.parsing:
            return text, []
        content, calls = parse_tool_calls(text, self.rendered)
        return content, calls if self.several else calls[:1]


def plan_tools(body: ChatCompletionCreate, tokenizer: Any) -> ToolPlan:
    """The request's tool plan; a 400 naming `tools` or `tool_choice` where they cannot be honoured."""
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs 'tools' to choose from.", param="tool_choice")
        return ToolPlan()
    if not supports_tools(tokenizer):
        raise InvalidRequest(
            f"The chat template of model {body.model!r} does not render tools, so the model could not see "
            "them. Use a model whose chat template takes `tools` (Qwen2.5 and later, Hermes, Llama 3.1 and "
            "later, ...), or describe the functions in a system message.",
            param="tools",
        )
    names = function_names(tools)
    several = body.parallel_tool_calls is not False
    if choice in (None, "auto"):
        return ToolPlan(rendered=tools, parsing=True, several=several)
    if choice == "none":
        return ToolPlan(rendered=tools)
    if choice == "required":
        return ToolPlan(rendered=tools, parsing=True, forced=tuple(names), several=several)
    function = choice.get("function") if isinstance(choice, dict) else None
    named = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(named, str):
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}} (other kinds of tools are not served here).',
            param="tool_choice",
        )
    if named not in names:
        raise InvalidRequest(
            f"tool_choice names function {named!r}, which is not among the tools ({', '.join(names)}).",
            param="tool_choice",
        )
    return ToolPlan(rendered=tools, parsing=True, forced=(named,), several=False)
