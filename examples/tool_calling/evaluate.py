"""Ask a model every validation request through `/v1/chat/completions` with the line's tools, greedily,
and count the answers that are exactly the expected call (function and every argument).

Runs against a running `rft serve` with the openai SDK (OPENAI_BASE_URL / OPENAI_API_KEY):

    python examples/tool_calling/evaluate.py MODEL [MODEL ...] [--response-format]

`--response-format` sends the job's `response_format.json` too, as training sampled with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from openai import OpenAI

HERE = Path(__file__).resolve().parent


def exact(call: Any, want: dict[str, Any]) -> bool:
    if call.function.name != want["name"]:
        return False
    args = json.loads(call.function.arguments)
    return {k: str(v).lower() for k, v in args.items()} == {k: str(v).lower() for k, v in want["arguments"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--valid", type=Path, default=HERE / "valid.jsonl")
    parser.add_argument("--response-format", action="store_true", help="hold answers to the call shape")
    args = parser.parse_args()
    client = OpenAI()
    lines = [json.loads(line) for line in args.valid.read_text().splitlines() if line.strip()]
    extra: dict[str, Any] = {}
    if args.response_format:
        extra["response_format"] = json.loads((HERE / "response_format.json").read_text())
    for model in args.models:
        hits, called, shown = 0, 0, list[str]()
        for line in lines:
            answer = client.chat.completions.create(
                model=model, messages=line["messages"], tools=line["tools"], temperature=0, max_tokens=40, **extra
            )
            calls = answer.choices[0].message.tool_calls or []
            called += bool(calls)
            hit = bool(calls) and exact(calls[0], line["call"])
            hits += hit
            if len(shown) < 3:
                text = answer.choices[0].message.content
                said = [f"{c.function.name}({c.function.arguments})" for c in calls] or text  # type: ignore[union-attr]
                shown.append(f"  {line['messages'][-1]['content']!r} -> {said} ({'exact' if hit else 'wrong'})")
        print(f"{model}: {hits}/{len(lines)} exact calls, {called}/{len(lines)} answers were calls")
        print("\n".join(shown))


if __name__ == "__main__":
    main()
