"""The FastAPI application: routers of each domain and the one handler that renders errors."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth.service import KeyCache
from service.checkpoints.endpoints import router as checkpoints_router
from service.core.bodylimit import BodySizeLimit
from service.core.db import session_factory
from service.core.errors import ApiError, InvalidRequest, NotFound, Unauthorized
from service.core.http import refuse_nul_characters
from service.core.observability import Observability, RequestObserver, admin_allowed
from service.core.openapi import openapi_document
from service.core.ratelimit import make_buckets
from service.core.settings import Settings, get_settings
from service.core.storage import storage_for
from service.dashboard import mount_dashboard
from service.files.endpoints import router as files_router
from service.fleet.endpoints import router as fleet_router
from service.graders.endpoints import router as graders_router
from service.jobs.endpoints import router as jobs_router
from service.models.endpoints import router as models_router
from service.webhooks.endpoints import router as webhooks_router

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="rft",
        version="0.1.0",
        summary="Self-hosted reinforcement fine-tuning, OpenAI-compatible",
        dependencies=[Depends(refuse_nul_characters)],
        lifespan=_frozen_while_serving,
    )
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.storage = storage_for(settings)
    app.state.storage.check()  # a wrong bucket or endpoint stops start-up, not the first upload
    app.state.sessionmaker = session_factory(settings)
    app.state.rate_buckets = make_buckets(settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_json_body_bytes)
    # the database is read through app.state.sessionmaker at each scrape (tests swap it after this)
    app.state.observability = Observability(lambda: app.state.sessionmaker())
    app.add_middleware(RequestObserver, observability=app.state.observability)  # outermost: 413s count too
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(graders_router)
    mount_dashboard(app)
    app.include_router(models_router)
    app.include_router(checkpoints_router)
    app.include_router(fleet_router)
    app.include_router(webhooks_router)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus metrics for the operator (service/core/observability.py)."""
        if not settings.admin_key:
            raise NotFound("Metrics are off: set RFT_ADMIN_KEY and scrape /metrics with it as a bearer token.")
        if not admin_allowed(settings, request.headers.get("authorization")):
            raise Unauthorized("The metrics need RFT_ADMIN_KEY as a bearer token, not a project's API key.")
        return Response(app.state.observability.render(), media_type=CONTENT_TYPE_LATEST)

    return app


@asynccontextmanager
async def _frozen_while_serving(_: FastAPI) -> AsyncIterator[None]:
    """What was built before serving lives as long as the server: out of the collector's sight, a
    full collection no longer walks it in the middle of a request (p99 in bench/status_poll_bench.py).
    Released at shutdown, so a process that builds many apps (the tests) frees the ones it is done with."""
    gc.freeze()
    yield
    gc.unfreeze()


def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic errors become one 400 naming the first bad field, as OpenAI answers."""
    first: dict[str, Any] = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header", "path")]
    # Union members ("auto" | int) add their type name to the location: drop those.
    # (Exact names: a field such as `integrations` is no type name.)
    loc = [p for p in loc if p not in ("int", "float", "str", "bool") and not p.startswith(("literal[", "constrained"))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message = "The request body is not valid JSON."
    else:
        detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"Invalid value for '{param}': {detail}" if param else detail
    return _api_error(_, InvalidRequest(message, param=param))


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ApiError(str(exc.detail))
    error.status_code, error.code = exc.status_code, "not_found" if exc.status_code == 404 else None
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    body = {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return JSONResponse(body, status_code=500)
