"""A real webhook receiver on 127.0.0.1 for tests and bench/webhook_bench.py: a thread serving HTTP that
checks each delivery's signature with the openai SDK's own verifier (not our signing code), records
what arrived and when, and can answer errors first (`fail_first`) or answer late (`delay`)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai

_VERIFIER = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1").webhooks


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() on arrival
    verified: bool
    status: int  # what the receiver answered

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Receiver:
    def __init__(self, fail_first: int = 0, fail_status: int = 500, delay: float = 0.0) -> None:
        self.secret: str | None = None  # set once the endpoint is created; until then nothing verifies
        self.fail_first, self.fail_status, self.delay = fail_first, fail_status, delay
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks?src=rft"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def verify(self, body: bytes, headers: dict[str, str], secret: str | None = None) -> bool:
        try:
            _VERIFIER.verify_signature(body, headers, secret=secret or self.secret)
            return True
        except (openai.InvalidWebhookSignatureError, ValueError, KeyError, TypeError):
            return False

    def wait_for(self, count: int, timeout: float = 30, **match: Any) -> list[Delivery]:
        """The first `count` deliveries whose event has the `match` fields (type=..., say), polled."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [d for d in self.deliveries if all(d.event.get(k) == v for k, v in match.items())]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{len(found)} of {count} deliveries {match} after {timeout}s"
                return found[:count]
            time.sleep(0.02)

    def _answer(self, body: bytes, headers: dict[str, str]) -> int:
        verified = self.secret is not None and self.verify(body, headers)
        with self._lock:
            failing = len(self.deliveries) < self.fail_first
            status = self.fail_status if failing else (204 if verified else 401)
            self.deliveries.append(Delivery(headers, body, time.time(), verified, status))
        if self.delay:
            time.sleep(self.delay)
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver._answer(body, {k.lower(): v for k, v in self.headers.items()})
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender timed out and hung up

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
