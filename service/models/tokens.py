"""Counting a job's prompt tokens without torch or transformers, for the pre-flight.

Where the model's tokenizer is a file on this machine (`tokenizer.json`, with its chat template in
`chat_template.jinja` or `tokenizer_config.json`), prompts are rendered with that template the way
transformers renders them (a sandboxed jinja2 with trimmed blocks, `raise_exception` and `tojson`)
and counted with the `tokenizers` library: "tokenizer". Elsewhere (the built-in tiny model, whose
tokenizer is built in memory; a GGUF not yet converted; a hub id) they are estimated at four
characters a token plus four a message for the template's markers: "estimate".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.core.settings import Settings
from service.models.registry import SMOLLM2, ModelSpec
from service.models.templates import template_messages, text_of

Counter = Callable[[Sequence[Mapping[str, Any]]], int]


def tokenizer_folder(spec: ModelSpec, settings: Settings) -> Path | None:
    """Where the model's tokenizer files are on this machine, if anywhere."""
    if spec.kind == "local":
        return Path(spec.location)
    if spec.name == SMOLLM2:
        return settings.data_dir / "models" / SMOLLM2  # the converted copy, once a worker here made it
    return None


def prompt_counter(spec: ModelSpec, settings: Settings) -> tuple[Counter, str]:
    """(a function counting one conversation's prompt tokens, "tokenizer" or "estimate")."""
    folder = tokenizer_folder(spec, settings)
    if folder is not None and (folder / "tokenizer.json").is_file():
        counter = _tokenizer_counter(str(folder))
        if counter is not None:
            return counter, "tokenizer"
    return estimate, "estimate"


def estimate(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(-(-len(text_of(m)) // 4) + 4 for m in messages)


@lru_cache(maxsize=8)
def _tokenizer_counter(folder: str) -> Counter | None:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    path = Path(folder)
    config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text())
    source = config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        source = (path / "chat_template.jinja").read_text()
    if not isinstance(source, str):
        return None  # no template, or several named ones: not worth guessing
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = _raise
    template = env.from_string(source)
    specials = {k: _content(v) for k, v in config.items() if k.endswith("_token") and _content(v) is not None}
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    def count(messages: Sequence[Mapping[str, Any]]) -> int:
        text = template.render(messages=template_messages(messages), add_generation_prompt=True, **specials)
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
