"""Terminal output for long waits: one redrawn status line on a TTY, plain lines elsewhere."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO


def bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def duration(seconds: float | None) -> str:
    """`1h02m`, `4m05s`, `35s`; `--` when unknown."""
    if seconds is None or seconds < 0:
        return "--"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def number(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class StatusLine:
    """A line that redraws in place (`\\r`) on a TTY; `print` writes a full line above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if not self.tty:
            return
        self.stream.write("\r" + text[: self.width()] + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def width(self) -> int:
        """Columns a line may use: one less than the terminal's, so it never wraps."""
        return shutil.get_terminal_size((100, 20)).columns - 1

    def print(self, text: str, stream: TextIO | None = None) -> None:
        self.clear()
        print(text, file=stream or self.stream, flush=True)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def done(self) -> None:
        """Leave the last drawn line on screen and move below it."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
