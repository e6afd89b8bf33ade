"""The OpenAPI document: FastAPI's, with the errors rft really answers.

FastAPI documents a 422 with its own `detail` list on every operation; rft answers every client
error with OpenAI's `{"error": {message, type, param, code}}` and a 4xx (400 for a bad body), so
that is what the document says. Clients and schemathesis then check responses against the truth.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

CLIENT_ERROR = {
    "description": "A client error: the message says what was wrong and `param` names where.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with `4XX: ErrorResponse` in place of its 422 (built once, then cached)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error.pop("$defs"), ErrorResponse=error)
        for path in document.get("paths", {}).values():
            for operation in path.values():
                operation["responses"].pop("422", None)
                operation["responses"]["4XX"] = CLIENT_ERROR
        app.openapi_schema = document
    return app.openapi_schema
