"""One error base carrying an HTTP status and OpenAI's `{message, type, param, code}`."""

from __future__ import annotations

import math
from typing import Any


class ApiError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def as_job_error(self) -> dict[str, Any]:
        """The `{code, message, param}` triple a failed job stores."""
        return {"code": self.code or "error", "message": self.message, "param": self.param}


class InvalidRequest(ApiError):
    code = "invalid_request"


class Unauthorized(ApiError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "file_too_large"


class InvalidTransition(InvalidRequest):
    code = "invalid_job_state"


class FileValidationError(ApiError):
    """A training or validation file broke an RFT data rule; stored on the failed job."""

    code = "invalid_file"


class TrainingUnavailable(ApiError):
    status_code = 500
    type = "server_error"
    code = "training_unavailable"


class RateLimited(ApiError):
    """Too many requests for one key: OpenAI's 429 with `Retry-After` (and the SDK's `retry-after-ms`)."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {
            "Retry-After": str(max(1, math.ceil(retry_after))),
            "retry-after-ms": str(math.ceil(retry_after * 1000)),
        }


class QuotaExceeded(ApiError):
    """A project is at one of its limits (files, stored bytes, queued jobs); waiting does not help,
    so 403 rather than 429, which the OpenAI SDK would retry."""

    status_code = 403
    code = "quota_exceeded"


class RequestTooLarge(ApiError):
    status_code = 413
    code = "request_too_large"
