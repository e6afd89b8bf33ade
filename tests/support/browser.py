"""The dashboard's browser-test harness: Chromium, a served `rft` with its SDK client, and a page
whose console errors are collected. Used by tests/test_dashboard.py's fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import openai
from playwright.sync_api import Browser, ConsoleMessage, Page

LAUNCH_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


def chromium() -> str | None:
    """Debian's chromium; installed here when missing, if this process may (root, apt-get)."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, capture_output=True, timeout=900, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900, check=False)
        subprocess.run(install, capture_output=True, timeout=900, check=False)
    return shutil.which("chromium")


@dataclass
class Server:
    url: str
    key: str
    client: openai.OpenAI
    files: tuple[str, str]

    def create_job(self, grader: dict[str, Any], seed: int = 7, **metadata: str) -> str:
        method: Any = {"type": "reinforcement", "reinforcement": {"grader": grader}}
        return self.client.fine_tuning.jobs.create(
            model="tiny-random-llama",
            training_file=self.files[0],
            validation_file=self.files[1],
            method=method,
            suffix="adder",
            seed=seed,
            metadata=metadata,
        ).id

    def wait(self, job_id: str, until: set[str], timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.client.fine_tuning.jobs.retrieve(job_id).status
            if status in until:
                return status
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {status} after {timeout}s")


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Browser, server: Server, *, key: bool = True, width: int = 1280, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        if key:  # as if the user had pasted it once before
            self.context.add_init_script(f"localStorage.setItem('rft.apiKey', {server.key!r})")
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.server = server

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def open(self, route: str) -> Page:
        self.page.goto(f"{self.server.url}/{route}")
        return self.page

    def count(self, selector: str) -> int:
        return int(self.page.evaluate("s => document.querySelectorAll(s).length", selector))

    def wait_count(self, selector: str, at_least: int, timeout: float = 20_000, *, exactly: bool = False) -> None:
        test = "===" if exactly else ">="
        self.page.wait_for_function(
            f"([s, n]) => document.querySelectorAll(s).length {test} n", arg=[selector, at_least], timeout=timeout
        )

    def no_horizontal_overflow(self) -> bool:
        return bool(self.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))

    def close(self) -> None:
        self.context.close()
