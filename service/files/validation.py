"""Streaming validation of RFT JSONL files, with line numbers and the rule each bad line broke.

Memory stays bounded whatever the file holds: lines are split from fixed-size chunks and a line
longer than `max_line_bytes` is reported and skipped without being kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.models.tools import tools_problem

ROLES = ("system", "developer", "user", "assistant", "tool")
SHOWN_ERRORS = 10


@dataclass
class FileReport:
    lines: int = 0
    examples: int = 0
    error_count: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    line_hashes: dict[bytes, int] = field(default_factory=dict)  # digest -> first line number

    def add_error(self, line: int, rule: str) -> None:
        self.error_count += 1
        if len(self.errors) < SHOWN_ERRORS:
            self.errors.append((line, rule))

    def summary(self) -> str:
        shown = "; ".join(f"line {n}: {rule}" for n, rule in self.errors)
        more = self.error_count - len(self.errors)
        return shown + (f"; and {more} more" if more > 0 else "")


def check_example(obj: Any) -> str | None:
    """Return the RFT rule `obj` breaks, or None. `messages` and `tools` are reserved keys."""
    if not isinstance(obj, dict):
        return f"must be a JSON object, got {type(obj).__name__}"
    messages = obj.get("messages")
    if messages is None:
        return "missing required key 'messages'"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return f"messages[{i}].content must be a string or a list of content parts"
    if messages[-1].get("role") != "user":
        return f"the last message must have role 'user' (the model answers it), got {messages[-1].get('role')!r}"
    if obj.get("tools", []) != [] and (problem := tools_problem(obj["tools"])):  # a line's [] is no tools
        return problem
    return None


def _check_line(raw: bytes, number: int, report: FileReport) -> None:
    if b"\x00" in raw:
        report.add_error(number, "contains NUL bytes: this looks like binary data, not JSONL")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add_error(number, f"is not valid UTF-8 (bad byte at offset {exc.start})")
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        report.add_error(number, f"is not valid JSON: {exc.msg} at column {exc.colno}")
        return
    rule = check_example(obj)
    if rule:
        report.add_error(number, rule)
        return
    report.examples += 1
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    report.line_hashes.setdefault(hashlib.blake2b(canonical, digest_size=16).digest(), number)


def validate_jsonl(chunks: Iterable[bytes], *, max_line_bytes: int, max_lines: int) -> FileReport:
    """Check every line of a JSONL stream; return counts, the first errors and line digests."""
    report = FileReport()
    buffer = bytearray()
    skipping = False  # inside a line already reported as too long
    number = 0

    def within_limit(line: int) -> bool:
        """Count a non-blank line; report the limit once, on the first line past it."""
        report.lines += 1
        if report.lines == max_lines + 1:
            report.add_error(line, f"the file has more than {max_lines} examples, the limit for this file")
        return report.lines <= max_lines

    def finish(raw: bytes) -> None:
        nonlocal number
        number += 1
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            return  # blank lines are allowed and skipped, but keep their numbers
        if within_limit(number):
            _check_line(raw, number, report)

    for chunk in chunks:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            if not skipping:
                buffer += piece
                if len(buffer) - buffer.endswith(b"\r") > max_line_bytes:  # a CRLF's \r is not part of the line
                    if within_limit(number + 1):
                        report.add_error(number + 1, f"is longer than {max_line_bytes} bytes")
                    buffer.clear()
                    skipping = True
            if newline < 0:
                break
            if skipping:
                number += 1
                skipping = False
            else:
                finish(bytes(buffer))
                buffer.clear()
            start = newline + 1
    if skipping:
        number += 1
    elif buffer:
        finish(bytes(buffer))
    if report.examples == 0 and report.error_count == 0:
        report.add_error(max(number, 1), "the file holds no examples (it is empty or only blank lines)")
    return report
