"""Write train.jsonl and valid.jsonl: requests that one of three functions answers, each line with
the `tools` offered and the `call` a grader expects; and response_format.json, which holds answers
to the shape of a call of one of the tools.

    python examples/tool_calling/write_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CITIES = [
    "Paris",
    "Tokyo",
    "Lima",
    "Oslo",
    "Cairo",
    "Sydney",
    "Toronto",
    "Madrid",
    "Nairobi",
    "Seoul",
    "Berlin",
    "Quito",
]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD"]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_timer",
            "description": "Start a countdown timer",
            "parameters": {
                "type": "object",
                "properties": {"minutes": {"type": "integer"}},
                "required": ["minutes"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                },
                "required": ["amount", "source", "target"],
            },
        },
    },
]


def request(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["weather", "timer", "currency"])
    if kind == "weather":
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        text = rng.choice(
            [
                "What's the weather in {c}, in {u}?",
                "How warm is it in {c}? Answer in {u}.",
                "Weather for {c} please, {u}.",
            ]
        )
        return text.format(c=city, u=unit), {"name": "get_weather", "arguments": {"city": city, "unit": unit}}
    if kind == "timer":
        minutes = rng.randint(1, 90)
        text = rng.choice(["Set a timer for {m} minutes.", "Start a {m} minute timer.", "Remind me in {m} minutes."])
        return text.format(m=minutes), {"name": "set_timer", "arguments": {"minutes": minutes}}
    amount, source, target = rng.randint(2, 500), *rng.sample(CURRENCIES, 2)
    text = rng.choice(["Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?", "{a} {s} in {t}, please."])
    return text.format(a=amount, s=source, t=target), {
        "name": "convert_currency",
        "arguments": {"amount": amount, "source": source, "target": target},
    }


def line(rng: random.Random) -> dict[str, Any]:
    text, call = request(rng)
    return {"messages": [{"role": "user", "content": text}], "tools": TOOLS, "call": call}


def call_format() -> dict[str, Any]:
    """A response_format whose JSON is a call of one of the tools: `{"name": ..., "arguments": {...}}`."""
    shapes = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": {**tool["function"]["parameters"], "additionalProperties": False},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in TOOLS
    ]
    return {"type": "json_schema", "json_schema": {"name": "call", "schema": {"anyOf": shapes}, "strict": True}}


def main() -> None:
    rng = random.Random(16)
    lines: list[dict[str, Any]] = []
    while len(lines) < 112:  # distinct requests, so validation holds none of the training ones
        candidate = line(rng)
        if all(candidate["messages"][-1] != seen["messages"][-1] for seen in lines):
            lines.append(candidate)
    for name, part in (("train.jsonl", lines[:80]), ("valid.jsonl", lines[80:])):
        (HERE / name).write_text("".join(json.dumps(x) + "\n" for x in part))
        print(f"wrote {len(part)} lines to {HERE / name}")
    (HERE / "response_format.json").write_text(json.dumps(call_format(), indent=2) + "\n")
    print(f"wrote {HERE / 'response_format.json'}")


if __name__ == "__main__":
    main()
