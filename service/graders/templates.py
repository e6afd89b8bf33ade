"""`{{item.*}}` / `{{sample.*}}` templates over one data line and one model output.

Paths are dotted names with list indexes: `item.a.b`, `item.list[0]`, `sample.output_json.answer`,
`sample.output_tools[0].function.name`. A path that does not resolve is an `invalid_variable_error`
for that sample (raised as `TemplateError`), never a crash; `sample.output_json` on an output that is
not JSON is a `sample_parse_error`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")
_MISSING_JSON = object()


class TemplateError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid_variable_error" | "sample_parse_error"


@dataclass
class Sample:
    """One model output as graders see it."""

    output_text: str
    output_tools: list[Any] = field(default_factory=list)
    choices: list[Any] = field(default_factory=list)
    output_json: Any = _MISSING_JSON

    @classmethod
    def from_text(cls, text: str, output_tools: list[Any] | None = None) -> Sample:
        try:
            parsed: Any = json.loads(text)
        except (ValueError, RecursionError):
            parsed = _MISSING_JSON
        return cls(output_text=text, output_tools=output_tools or [], output_json=parsed)

    @classmethod
    def from_completion(cls, text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> Sample:
        """A sampled completion as graders see it: where the prompt offered function `tools`, the
        calls read out of it (`service.models.tools`, the parser chat uses) are `output_tools`, in
        chat's `tool_calls` shape, and the text around them is `output_text`."""
        from service.models.tools import parse_tool_calls

        content, calls = parse_tool_calls(text, tools)
        return cls.from_text(content if calls else text, calls)

    def as_dict(self) -> dict[str, Any]:
        """The `sample` argument of a python grader's `grade(sample, item)`."""
        data: dict[str, Any] = {
            "output_text": self.output_text,
            "output_tools": self.output_tools,
            "choices": self.choices,
        }
        data["output_json"] = None if self.output_json is _MISSING_JSON else self.output_json
        return data


def parse_path(path: str) -> list[str | int]:
    """`item.a[0].b` -> ["item", "a", 0, "b"]; ValueError for anything else."""
    steps: list[str | int] = []
    pos = 0
    while pos < len(path):
        match = STEP.match(path, pos)
        if match is None or (pos == 0 and match.group(0).startswith(".")):
            raise ValueError(f"cannot parse template variable {path!r} at character {pos + 1}")
        steps.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not steps or steps[0] not in ("item", "sample"):
        raise ValueError(f"template variable {path!r} must start with 'item.' or 'sample.'")
    return steps


def check_template(template: str) -> None:
    """Raise ValueError if any placeholder in `template` is malformed (for config validation)."""
    for match in PLACEHOLDER.finditer(template):
        parse_path(match.group(1))


def lookup(path: str, sample: Sample, item: dict[str, Any]) -> Any:
    steps = parse_path(path)
    if steps[0] == "sample" and len(steps) > 1 and steps[1] == "output_json" and sample.output_json is _MISSING_JSON:
        raise TemplateError("sample_parse_error", f"{{{{{path}}}}}: the model output is not valid JSON")
    value: Any = {"item": item, "sample": sample.as_dict()}
    for depth, step in enumerate(steps):
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            shown = path if depth == len(steps) - 1 else f"{path} (stopped at {step!r})"
            raise TemplateError("invalid_variable_error", f"{{{{{shown}}}}} does not exist in this sample") from None
    return value


def to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render(template: str, sample: Sample, item: dict[str, Any]) -> str:
    """Fill every placeholder; non-string values are written as JSON."""
    return PLACEHOLDER.sub(lambda m: to_text(lookup(m.group(1), sample, item)), template)
