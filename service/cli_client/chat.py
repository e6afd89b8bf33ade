"""`rft chat MODEL`: a streaming chat over `/v1/chat/completions`, one-shot or as a REPL."""

from __future__ import annotations

import sys
from typing import Any, cast

from service.cli_client.api import Api, describe

HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def chat(
    api: Api,
    model: str,
    *,
    system: str | None = None,
    message: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> int:
    """One reply to `message`, or a conversation read line by line from stdin (history is kept)."""
    from openai import APIError

    options: dict[str, Any] = {}
    if temperature is not None:
        options["temperature"] = temperature
    if max_tokens is not None:
        options["max_completion_tokens"] = max_tokens
    start = [{"role": "system", "content": system}] if system else []
    if message is not None:
        reply(api, model, [*start, {"role": "user", "content": message}], options)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model}; {HELP}", file=sys.stderr)
    history = list(start)
    while True:
        try:
            text = input("> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": reply(api, model, history, options)})
        except KeyboardInterrupt:
            print("\n[stopped; this turn is forgotten]", file=sys.stderr)
            history.pop()
        except APIError as exc:
            if not interactive:
                raise
            history.pop()  # a failed turn is not part of the conversation
            print(f"error: {describe(exc)}", file=sys.stderr)


def reply(api: Api, model: str, messages: list[dict[str, str]], options: dict[str, Any]) -> str:
    """Stream one assistant reply to stdout as it arrives; returns its full text."""
    stream = api.openai.chat.completions.create(model=model, messages=cast(Any, messages), stream=True, **options)
    parts: list[str] = []
    with stream:
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                parts.append(delta)
                print(delta, end="", flush=True)
    print(flush=True)
    return "".join(parts)
