"""What a completion must look like, as a grammar that sampling is held to (constrained decoding).

Chat's `response_format` and forced tool calls, an RFT job's `response_format` and a `label_model`
grader's labels each become one `Constraint`: a Lark grammar in llguidance's dialect (a maintained
constrained-decoding library, the one vLLM's `guidance` backend runs too), which embeds JSON
schemas with `%json`. One grammar text serves both rollout engines: our decode loop masks the
logits with llguidance's token masks (`service.models.guided`), and vLLM takes the same text as its
structured-output grammar. JSON comes out compact and single-line (`{"a": 1, "b": [2, 3]}`, the
separators of Python's `json.dumps`): free whitespace lets a small model pad an answer with blank
lines until it runs out of tokens, and then it no longer parses.

Importing this module is cheap (llguidance without torch): the API checks a grammar when a request
or a job arrives, so an unsupported schema is a 400 naming the field, not a failed job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.core.errors import InvalidRequest

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Constraint:
    """A grammar every sampled completion must follow, then end (an end-of-turn id)."""

    lark: str
    kind: str  # "json_schema" | "json_object" | "tool_calls" | "labels": what it was built from

    def grammar(self) -> str:
        """llguidance's serialized form, what `LLMatcher` takes."""
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_lark(self.lark)


def json_rule(schema: Mapping[str, Any], param: str) -> str:
    """`%json {...}`: a Lark rule body matching JSON of `schema`, compact; a 400 naming `param`
    where llguidance cannot compile the schema (a bad `$ref`, an unknown type, ...)."""
    from llguidance import LLMatcher

    styled = {**schema, "x-guidance": {**dict(schema.get("x-guidance") or {}), **JSON_STYLE}}
    try:
        failed, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_json_schema(styled))
    except Exception as exc:  # llguidance raises ValueError, or others on schemas it cannot read at all
        failed, messages = True, [f"{type(exc).__name__}: {exc}"]
    if failed:
        raise InvalidRequest(f"The JSON schema cannot be used to constrain sampling: {messages[0]}", param=param)
    return "%json " + json.dumps(styled)


def from_response_format(response_format: Mapping[str, Any] | None, param: str) -> Constraint | None:
    """OpenAI's `response_format`: `text` (None: no constraint), `json_object` (any JSON object) or
    `json_schema` (`{"json_schema": {"name", "schema", "strict"?, "description"?}}`)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object with a 'type'.", param=param)
    kind = response_format.get("type")
    extra = set(response_format) - {"type", "json_schema"}
    if extra:
        raise InvalidRequest(f"Unknown key(s) in response_format: {', '.join(sorted(extra))}.", param=param)
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(f"start: {json_rule({'type': 'object'}, param)}", "json_object")
    if kind != "json_schema":
        raise InvalidRequest(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}.", param=f"{param}.type"
        )
    spec = response_format.get("json_schema")
    where = f"{param}.json_schema"
    if not isinstance(spec, Mapping):
        raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' object.", param=where)
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise InvalidRequest(f"Unknown key(s) in json_schema: {', '.join(sorted(unknown))}.", param=where)
    if not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise InvalidRequest("json_schema.name must be 1-64 letters, digits, '_' or '-'.", param=f"{where}.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise InvalidRequest("json_schema.schema must be a JSON schema object.", param=f"{where}.schema")
    return Constraint(f"start: {json_rule(schema, f'{where}.schema')}", "json_schema")


def for_labels(labels: Sequence[str]) -> Constraint:
    """Exactly one of `labels`, nothing around it: a `label_model` grader's answer."""
    return Constraint("start: " + " | ".join(json.dumps(label) for label in labels), "labels")


def for_tool_calls(
    calls: Sequence[tuple[str, Mapping[str, Any]]], tagged: bool, *, several: bool, param: str
) -> Constraint:
    """One call (`several`: one or more) of the given functions, each `(name, parameters schema)`,
    written as the model's template teaches: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    (Hermes and Qwen templates, `tagged`) or the bare JSON object."""
    options = [
        json_rule(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": dict(parameters or {"type": "object"})},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            param,
        )
        for name, parameters in calls
    ]
    call = "call: " + " | ".join(options)
    if tagged:
        one = '"<tool_call>\\n" call "\\n</tool_call>"'
        body = f'start: {one} ("\\n" {one})*' if several else f"start: {one}"
    else:
        body = 'start: call ("\\n" call)*' if several else "start: call"
    return Constraint(f"{body}\n{call}", "tool_calls")
