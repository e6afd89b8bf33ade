"""`reasoning_effort` on local models: the chat template's thinking switch.

OpenAI's reasoning models take an effort level; the open models this server trains have at most a
binary switch in their chat template, `enable_thinking` (Qwen3, SmolLM3 and others read it). So:

- `none`, `minimal`, `low`: thinking off (`enable_thinking = false`);
- `medium`, `high`, `xhigh`, `max`: thinking on (`enable_thinking = true`);
- `default` (RFT hyperparameters) or unset (grader sampling params): the template's own default.

A model whose template has no switch (SmolLM2, `tiny-random-llama`) never thinks: it takes only the
values that ask for nothing else (`default`, unset, `none`); any other is a 400 naming the model,
since accepting it would change nothing.

The switch is pinned into a tokenizer's template text (`pin`) rather than passed at each render:
the trained policy's tokenizer then renders every rollout, evaluation, saved checkpoint, chat and
downloaded copy the same way, so the model that was trained is the model that is served.

Importing this module is cheap (the API checks templates without loading torch).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from service.core.errors import InvalidRequest

SWITCH = "enable_thinking"
OFF = ("none", "minimal", "low")
ON = ("medium", "high", "xhigh", "max")
# Templates of the built-in models, which have no switch (their text is not on disk before first use).
NO_SWITCH_MODELS = ("smollm2-135m-instruct", "tiny-random-llama")
_PIN = re.compile(r"^\{#- rft: reasoning_effort -#\}\{%- set enable_thinking = (?:true|false) -%\}\n")


def switch_for(effort: str | None) -> bool | None:
    """The `enable_thinking` value an effort level asks for; None: leave the template's default."""
    if effort in OFF:
        return False
    if effort in ON:
        return True
    return None


def asks_for_nothing(effort: str | None) -> bool:
    """Whether a model without a switch satisfies `effort` as it is (it never thinks)."""
    return effort in (None, "default", "none")


def template_has_switch(template: Any) -> bool:
    """Whether a chat template (text, or transformers' {name: text} / [{name, template}] forms) reads the switch."""
    if isinstance(template, dict):
        return any(template_has_switch(t) for t in template.values())
    if isinstance(template, list):
        return any(template_has_switch(t.get("template") if isinstance(t, dict) else t) for t in template)
    return isinstance(template, str) and SWITCH in template


def folder_template(folder: Path) -> Any:
    """The chat template saved in a Hugging Face folder, in any of the places transformers writes it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                continue
            if template is not None:
                return template
    return None


def folder_has_switch(folder: Path) -> bool | None:
    """Whether the model saved in `folder` has the switch; None where its template is not there."""
    template = folder_template(folder)
    return None if template is None else template_has_switch(template)


def refusal(model: str, effort: str, param: str) -> InvalidRequest:
    # RFT hyperparameters take default|low|medium|high; a grader's sampling params none..max or null.
    instead = "'default'" if "hyperparameters" in param else "unset or 'none'"
    return InvalidRequest(
        f"{param} {effort!r} needs a model that can reason, but the chat template of {model!r} has no thinking "
        f"switch ({SWITCH}), so it never reasons: leave it {instead}, or use a model whose template reads "
        "enable_thinking (e.g. Qwen3), where 'none', 'minimal' and 'low' turn thinking off and 'medium' and "
        "above turn it on.",
        param=param,
    )


def check(model: str, has_switch: bool | None, effort: str | None, param: str) -> None:
    """Refuse `effort` for a model known to lack the switch; unknown (None) passes, for a later check."""
    if has_switch is False and not asks_for_nothing(effort):
        raise refusal(model, str(effort), param)


def pin(tokenizer: Any, model: str, effort: str | None, param: str) -> Any:
    """`tokenizer` rendering with the switch `effort` asks for: the same object when it asks for nothing,
    else a copy whose template sets `enable_thinking` first (an earlier pin replaced). InvalidRequest
    where the template has no switch and `effort` asks for one."""
    enabled = switch_for(effort)
    template = getattr(tokenizer, "chat_template", None)
    if not template_has_switch(template):
        check(model, False, effort, param)
        return tokenizer
    if enabled is None:
        return tokenizer
    assert template is not None  # it has the switch
    pinned = copy.copy(tokenizer)
    prefix = f"{{#- rft: reasoning_effort -#}}{{%- set enable_thinking = {str(enabled).lower()} -%}}\n"
    if isinstance(template, dict):
        pinned.chat_template = {k: prefix + _PIN.sub("", v) for k, v in template.items()}
    else:
        pinned.chat_template = prefix + _PIN.sub("", template)
    return pinned


def has_switch(name: str, kind: str, location: str) -> bool | None:
    """Whether model `name` (resolved to `kind` and `location`, as `registry.ModelSpec` has them) has the
    switch, read without loading it; None where its template is not on this machine (a hub id not cached)."""
    if name in NO_SWITCH_MODELS or kind in ("gguf", "tiny"):
        return False
    if kind == "local":
        return folder_has_switch(Path(location))
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        for filename in ("chat_template.jinja", "tokenizer_config.json"):
            cached = try_to_load_from_cache(location, filename)
            if isinstance(cached, str):
                return folder_has_switch(Path(cached).parent)
    return None
