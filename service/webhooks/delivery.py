"""One attempt to deliver a signed event: the POST, with its timeout, and what came of it."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from functools import cache

import httpx2

from service.core.settings import Settings
from service.webhooks import signing, targets

ERROR_BODY_BYTES = 512  # of a failed answer's body, kept in the delivery log


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # None: no HTTP answer (refused target, connection error, timeout)
    latency_ms: float | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, signing_secrets: list[str], message_id: str, body: bytes, settings: Settings) -> Outcome:
    """POST `body` to `url` once, signed, to the address the target check let through; never raises
    for what the receiver or the network did (that is the outcome)."""
    try:
        target, addresses = targets.check(url, settings)
    except targets.TargetRefused as exc:
        return Outcome(None, None, f"not sent: {exc.message}")
    headers = signing.headers(signing_secrets, message_id, int(time.time()), body) | {"host": target.netloc}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else None
    started = time.perf_counter()
    try:
        # trust_env=False: no proxy from the environment, which would connect by name, not to the checked address
        with (
            httpx2.Client(
                timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False, verify=_tls()
            ) as client,
            client.stream(
                "POST", target.pinned_url(addresses[0]), content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            answer = _head_of(response)
    except httpx2.TimeoutException:
        return Outcome(None, _ms(started), f"timed out after {settings.webhook_timeout_seconds:g}s")
    except httpx2.HTTPError as exc:
        return Outcome(None, _ms(started), f"{type(exc).__name__}: {exc}")
    latency = _ms(started)
    if 200 <= response.status_code < 300:
        return Outcome(response.status_code, latency, None)
    return Outcome(response.status_code, latency, f"HTTP {response.status_code}: {answer}".strip())


@cache
def _tls() -> ssl.SSLContext:
    """The TLS context, built once: building it (loading the CA bundle) took 51 ms a delivery, as much
    as the rest of a delivery to a local receiver (bench/webhook_bench.py)."""
    return httpx2.create_ssl_context(trust_env=False)


def _head_of(response: httpx2.Response) -> str:
    """The first bytes of the answer, as text (a receiver's error page can be any size)."""
    kept = b""
    for chunk in response.iter_raw():
        kept += chunk
        if len(kept) >= ERROR_BODY_BYTES:
            break
    return kept[:ERROR_BODY_BYTES].decode("utf-8", errors="replace")


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
