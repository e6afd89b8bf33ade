"""The web dashboard: static files served at `/` that read everything through the public `/v1` API.

It holds no data of its own and has no private endpoints: the browser sends the API key the user
pasted (kept in localStorage) as `Authorization: Bearer`, exactly as the openai SDK would. The
content security policy allows only our own origin, so nothing loads from a CDN and no script
could send the key elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard page at `GET /` and its assets under `/dashboard/`, outside the OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.mount("/dashboard", StaticFiles(directory=STATIC_DIR), name="dashboard")
