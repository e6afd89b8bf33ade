"""Start the real `rft` processes for end-to-end tests, and stop them whatever happens."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path, prefix: list[str] | None = None) -> None:
        """`rft <argv>`, run under `prefix` where given (a bwrap sandbox, say)."""
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "service.cli", *argv],
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the main process (as a service manager would), then, after `timeout` seconds,
        SIGKILL to what is left of its process group."""
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()
        self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_healthy(base_url: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"server exited early:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{proc.output()[-3000:]}")


def printed_api_key(proc: Proc) -> str:
    """The API key `rft serve` printed at start-up."""
    found = re.search(r"API key:\s+(\S+)", proc.output())
    if found is None:
        raise AssertionError(f"rft serve printed no API key:\n{proc.output()[-3000:]}")
    return found.group(1)


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment has `name=value` (to find workers a server started)."""
    wanted = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
