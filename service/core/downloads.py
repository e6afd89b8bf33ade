"""Downloads of stored objects with the same behaviour from every store: a single `Range` honoured
(resume a broken download; `If-Range` against the sha256 ETag restarts it when the bytes changed),
the sha256 as ETag and header, and the body streamed from storage a chunk at a time; or, where the
store offers presigned URLs and the settings ask for them, a redirect to the store itself."""

from __future__ import annotations

import re

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from service.core.storage import Storage

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def stored_response(
    request: Request,
    storage: Storage,
    key: str,
    *,
    size: int,
    sha256: str,
    filename: str,
    media_type: str,
    headers: dict[str, str],
) -> Response:
    etag = f'"{sha256}"'
    headers = {**headers, "ETag": etag, "Cache-Control": "private"}
    if url := storage.download_url(key, filename):
        return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "no-store"})
    headers |= {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if_range = request.headers.get("if-range")
    span = _span(request.headers.get("range", ""), size) if if_range in (None, etag) else None
    if span == "unsatisfiable":
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if not isinstance(span, tuple):
        body = storage.iter_bytes(key) if size else iter(())
        return StreamingResponse(body, media_type=media_type, headers={**headers, "Content-Length": str(size)})
    start, end = span
    headers |= {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)}
    body = storage.iter_bytes(key, start, end)
    return StreamingResponse(body, status_code=206, media_type=media_type, headers=headers)


def _span(header: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single-range `Range` header; None to send it all (no header, several
    ranges or one we do not parse, which RFC 9110 lets us ignore); "unsatisfiable" past the end."""
    match = _RANGE.match(header.strip())
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        if int(last) == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - int(last)), size - 1
    start = int(first)
    if last and int(last) < start:  # malformed: ignored
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last), size - 1) if last else size - 1
