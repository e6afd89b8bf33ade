"""Graceful shutdown of a training worker: SIGTERM ends the running job's step, not the job.

`docker stop` and systemd send SIGTERM, then SIGKILL after a grace period. Celery's own answer to
SIGTERM is a warm shutdown that waits for the running task, which for a training job means minutes
or hours, so the grace period runs out and the step in flight is lost. Instead:

- the process that runs the job (Celery's prefork child) turns SIGTERM into a flag, which
  `JobContext.control()` reports as "stop" after the current step; the trainer writes a checkpoint
  and the runner puts the job back in the queue without counting the attempt (`runner.requeue`);
- the Celery main process, on its own SIGTERM, forwards one to its pool children (a service manager
  signals only the main process), then its warm shutdown waits only for that one step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
_requested = threading.Event()


def requested() -> bool:
    """Whether this process was asked to stop (its running job should requeue after its step)."""
    return _requested.is_set()


def request() -> None:
    _requested.set()


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    if not _requested.is_set():
        log.warning("SIGTERM: the running job checkpoints after its current step and goes back to the queue")
    _requested.set()


def install_handler() -> None:
    """In the process that runs a job: SIGTERM sets the flag instead of killing the process.
    (Before this, billiard's own handler exits the child, which is right while it holds no job.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces or parentheses: fields after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def forward_to_children(**_: Any) -> None:
    """In the Celery main process, when its shutdown begins: pass SIGTERM on to the pool children.

    The flag is set here too: a child forked after this point (the pool replaces one that finished
    its job) inherits it, so a wake-up the stopping worker still consumes is handed on, not run."""
    _requested.set()
    for child in children_of(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
