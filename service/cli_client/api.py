"""Where the client commands find the server, how they talk to it, and how its errors read.

Plain httpx2 carries the downloads; the openai SDK (httpx2 since openai 3), riding the same
`httpx2.Client`, carries the rest. Tests hand in a client bound to the app (FastAPI's TestClient is
an `httpx2.Client`) or to an `httpx2.MockTransport`.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx2

if TYPE_CHECKING:
    from openai import OpenAI

# What `rft serve` listens on by default (Settings.host / Settings.port).
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class CliError(Exception):
    """A failure the user can act on; printed as `error: ...` without a traceback."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


class ServerError(CliError):
    """The server's `{"error": {message, type, param, code}}` from a request made with plain httpx2."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(error_text(status, body))


def error_text(status: int | None, body: Any) -> str:
    """`<server message> (404 not_found, param: job_id)` from an OpenAI-style error body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        text = str(body or "").strip()[:500] or "no message"
        return f"{text} (HTTP {status})" if status else text
    detail = " ".join(str(p) for p in (status, body.get("code")) if p is not None)
    if body.get("param"):
        detail += f", param: {body['param']}"
    return f"{body.get('message') or 'no message'} ({detail.strip(', ')})"


def describe(exc: BaseException) -> str | None:
    """What to tell the user about a failure talking to the server; None for a real bug."""
    import openai

    if isinstance(exc, CliError):
        return exc.message
    if isinstance(exc, openai.APIStatusError):
        return error_text(exc.status_code, exc.body)
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        url = _request_url(exc)
        cause = exc.__cause__ or exc
        return f"cannot reach the rft server at {url} ({cause}); is it running? (RFT_BASE_URL or --base-url)"
    if isinstance(exc, openai.APIError):
        return error_text(None, exc.body) if isinstance(exc.body, dict) else exc.message
    if isinstance(exc, httpx2.HTTPError):
        return str(exc)
    return None


def _request_url(exc: BaseException) -> str:
    try:
        url = exc.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx2 raises RuntimeError when no request is attached
        return "the configured address"
    return f"{url.scheme}://{url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc}"


def normalize_base_url(raw: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all mean the same server."""
    url = raw.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"base URL {raw!r} must start with http:// or https:// (e.g. {DEFAULT_BASE_URL})")
    return url if url.endswith("/v1") else url + "/v1"


def resolve_api_key(flag: str | None, base_url: str) -> str:
    """--api-key, else RFT_API_KEY, else the key a local `rft serve` keeps in its data dir."""
    key = flag or os.environ.get("RFT_API_KEY")
    if key:
        return key
    # Only ever sent to a server on this machine: that is the server the file belongs to.
    if urlsplit(base_url).hostname in LOOPBACK:
        data_dir = Path(os.environ.get("RFT_DATA_DIR") or Path.home() / ".rft")
        try:
            return (data_dir / "api_key").read_text().strip()
        except OSError:
            pass
    raise CliError("no API key: set RFT_API_KEY or pass --api-key (`rft serve` prints one)")


class Api:
    """One server: its `/v1` base URL, the key, and the HTTP client every request goes through."""

    def __init__(self, base_url: str, api_key: str, http: httpx2.Client | None = None) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self._owns_http = http is None
        self.http = http or httpx2.Client(timeout=httpx2.Timeout(60.0, connect=10.0), follow_redirects=True)

    @classmethod
    def from_args(cls, base_url: str | None, api_key: str | None, http: httpx2.Client | None = None) -> Api:
        url = normalize_base_url(base_url or os.environ.get("RFT_BASE_URL") or DEFAULT_BASE_URL)
        return cls(url, resolve_api_key(api_key, url), http)

    @cached_property
    def openai(self) -> OpenAI:
        # Imported here: the SDK takes half a second to import, and `rft serve`/`rft worker` never need it.
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, http_client=self.http)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", **extra}

    def close(self) -> None:
        if self._owns_http:
            self.http.close()


def raise_for_error(response: httpx2.Response) -> None:
    """Turn a non-2xx response (streamed or not) into a ServerError carrying the server's message."""
    if response.is_success:
        return
    response.read()
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise ServerError(response.status_code, body)
