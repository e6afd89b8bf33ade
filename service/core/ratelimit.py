"""Requests per second per API key: a token bucket (`rate` tokens a second, at most `burst`).

In production the buckets live in Redis, updated by one Lua script (atomic, on the server's clock),
so every API process and host shares them; `rft serve` without Redis keeps them in the process.
If Redis cannot be reached the request is let through and the failure logged: an outage of the
limiter must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Protocol

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.core.db import transaction
from service.core.errors import RateLimited
from service.core.limits import limits_for
from service.core.settings import Settings

log = logging.getLogger(__name__)

# KEYS[1]: the bucket. ARGV: rate, burst. Returns {allowed (0/1), seconds to wait (as a string)}.
TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed, wait = 0, (1 - tokens) / rate
if tokens >= 1 then
  tokens, allowed, wait = tokens - 1, 1, 0
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class Buckets(Protocol):
    blocking: bool  # does take() do I/O (so must not run on the event loop)?

    def take(self, key: str, rate: float, burst: int) -> float:
        """Take one token from `key`'s bucket: 0.0 if there was one, else the seconds until there is."""


class MemoryBuckets:
    blocking = False

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def take(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._state.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1:
                self._state[key] = (tokens - 1, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1 - tokens) / rate


class RedisBuckets:
    blocking = True

    def __init__(self, url: str, prefix: str = "rft:rate:") -> None:
        import redis

        self.prefix = prefix
        self._client: Any = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(TOKEN_BUCKET)

    def take(self, key: str, rate: float, burst: int) -> float:
        allowed, wait = self._script(keys=[self.prefix + key], args=[rate, burst])
        return 0.0 if int(allowed) else float(wait)


def make_buckets(settings: Settings) -> Buckets:
    url = settings.rate_limit_url
    return RedisBuckets(url) if url else MemoryBuckets()


async def enforce_rate(request: Request, project_id: str, key_id: str) -> None:
    """check_rate from the async auth dependency: inline where it does no I/O, else on a worker thread."""
    settings: Settings = request.app.state.settings
    if request.app.state.rate_buckets.blocking or settings.project_limits:  # Redis, or a project-name lookup
        await run_in_threadpool(check_rate, request, project_id, key_id)
    else:
        check_rate(request, project_id, key_id)


def check_rate(request: Request, project_id: str, key_id: str) -> None:
    """Raise 429 if the key is past its project's rate; the hook `get_subject` calls."""
    settings: Settings = request.app.state.settings
    limits = limits_for(settings, project_id, lambda: transaction(request.app.state.sessionmaker))
    buckets: Buckets = request.app.state.rate_buckets
    try:
        wait = buckets.take(key_id, limits.requests_per_second, limits.request_burst)
    except Exception:
        log.exception("rate limiter unavailable; letting the request through")
        return
    if wait > 0:
        raise RateLimited(
            f"Rate limit reached for API key {key_id} of project {project_id}: {limits.requests_per_second:g} "
            f"requests per second (burst {limits.request_burst}). Please try again in {math.ceil(wait * 1000)}ms.",
            retry_after=wait,
        )
