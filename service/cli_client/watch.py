"""`rft jobs watch` and `rft jobs events`: poll a job and its events until the job ends.

Events come newest first; new ones are found by paging back until the last one already seen.
Metrics events carry `step`, `total_steps`, `train_reward_mean`, `kl` every step and
`valid_reward_mean` on evaluation steps (workers/rl/loop.py), so the last validation reward is kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.cli_client.api import Api, CliError
from service.cli_client.progress import StatusLine, bar, duration, number

TERMINAL = {"succeeded", "failed", "cancelled", "paused"}
PAGE = 100
EXIT_PAUSED = 3


@dataclass
class Progress:
    status: str = ""
    step: int | None = None
    total: int | None = None
    train: float | None = None
    valid: float | None = None
    kl: float | None = None
    estimated_finish: int | None = None

    def absorb(self, event: Any) -> bool:
        """Take a metrics event's figures; True when it moved the step."""
        data = event.data if event.type == "metrics" and isinstance(event.data, dict) else None
        if not data or not isinstance(data.get("step"), int):
            return False
        moved = data["step"] != self.step
        self.step, self.total = data["step"], data.get("total_steps", self.total)
        self.train, self.kl = data.get("train_reward_mean"), data.get("kl")
        if data.get("valid_reward_mean") is not None:
            self.valid = data["valid_reward_mean"]
        return moved

    def figures(self, now: float) -> str:
        eta = self.estimated_finish - now if self.estimated_finish and self.status == "running" else None
        step = f"{self.step}/{self.total}" if self.step is not None else f"-/{self.total or '-'}"
        pct = f"{100 * self.step / self.total:3.0f}%" if self.step is not None and self.total else "  -%"
        return (
            f"step {step}  {pct}  ETA {duration(eta)}  train {number(self.train)}  "
            f"valid {number(self.valid)}  kl {number(self.kl, 4)}"
        )

    def line(self, now: float, width: int) -> str:
        """The TTY line; without the bar when the terminal is too narrow for everything."""
        fraction = self.step / self.total if self.step is not None and self.total else 0.0
        full = f"{self.status} {bar(fraction, 20)} {self.figures(now)}"
        return full if len(full) <= width else f"{self.status} {self.figures(now)}"


def newer_events(api: Api, job_id: str, seen_id: str | None) -> list[Any]:
    """Events after `seen_id`, oldest first; with no `seen_id`, the newest page."""
    from openai import omit

    events: list[Any] = []
    after: str | None = None
    while True:
        page = api.openai.fine_tuning.jobs.list_events(job_id, limit=PAGE, after=after or omit)
        for event in page.data:
            if event.id == seen_id:
                return events[::-1]
            events.append(event)
        if seen_id is None or not page.has_more or not page.data:
            return events[::-1]
        after = page.data[-1].id


def event_line(event: Any) -> str:
    when = datetime.fromtimestamp(event.created_at).strftime("%Y-%m-%d %H:%M:%S")
    text = f"{when}  {event.level:<5}  {event.message}"
    if event.type == "metrics" and isinstance(event.data, dict):
        progress = Progress()
        progress.absorb(event)
        valid = f"  valid {number(progress.valid)}" if progress.valid is not None else ""
        text += f"  train {number(progress.train)}{valid}  kl {number(progress.kl, 4)}"
    return text


def watch(api: Api, job_id: str, *, interval: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow a job until it ends: 0 when it succeeded, 1 failed or cancelled, 3 paused."""
    from openai import APIConnectionError

    status_line, progress = StatusLine(), Progress()
    seen: str | None = None
    connected = True
    try:
        while True:
            try:
                job = api.openai.fine_tuning.jobs.retrieve(job_id)
                events = newer_events(api, job_id, seen)
            except APIConnectionError:  # a restarting server is no reason to stop watching
                if connected:
                    status_line.print(f"lost the connection to {api.base_url}; retrying", sys.stderr)
                connected = False
                sleep(interval)
                continue
            connected = True
            seen = events[-1].id if events else seen
            _update(status_line, progress, job, events)
            if job.status in TERMINAL:
                status_line.done()
                return _outcome(job)
            sleep(interval)
    except KeyboardInterrupt:
        status_line.done()
        print(f"stopped watching; {job_id} keeps running (`rft jobs cancel {job_id}` stops it)", file=sys.stderr)
        return 130


def _update(status_line: StatusLine, progress: Progress, job: Any, events: list[Any]) -> None:
    now = time.time()
    if job.status != progress.status and not status_line.tty:
        status_line.print(f"status: {job.status}")
    progress.status, progress.estimated_finish = job.status, job.estimated_finish
    moved = False
    failure = job.error.message if job.error else None
    for event in events:
        moved = progress.absorb(event) or moved
        if event.level in ("warn", "error") and event.message != failure:  # a failure is reported once, at the end
            status_line.print(event_line(event), sys.stderr)
    if status_line.tty:
        status_line.show(progress.line(now, status_line.width()))
    elif moved:  # one line a poll, however many steps passed since the last
        status_line.print(progress.figures(now))


def _outcome(job: Any) -> int:
    if job.status == "succeeded":
        print(f"succeeded: {job.fine_tuned_model}", flush=True)
        return 0
    if job.status == "paused":
        print(f"paused; continue it with `rft jobs resume {job.id}`", file=sys.stderr)
        return EXIT_PAUSED
    if job.status == "failed":
        error = job.error
        if error is None:
            raise CliError(f"job {job.id} failed (no error recorded)")
        param = f", param: {error.param}" if error.param else ""
        raise CliError(f"job {job.id} failed: {error.message} ({error.code}{param})")
    raise CliError(f"job {job.id} was cancelled")


def events(
    api: Api,
    job_id: str,
    *,
    limit: int,
    follow: bool,
    interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the last `limit` events oldest first; with `follow`, then new ones until the job ends."""
    page = api.openai.fine_tuning.jobs.list_events(job_id, limit=limit)
    backlog = page.data[::-1]
    for event in backlog:
        print(event_line(event), flush=True)
    if not follow:
        return 0
    seen = backlog[-1].id if backlog else None
    try:
        while True:
            status = api.openai.fine_tuning.jobs.retrieve(job_id).status
            new = newer_events(api, job_id, seen)
            for event in new:
                print(event_line(event), flush=True)
            seen = new[-1].id if new else seen
            if status in TERMINAL:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 130
