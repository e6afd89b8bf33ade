"""Streaming multipart upload: the file part goes straight to storage, hashed on the way.

Starlette's form parser spools the whole body to a temporary file before the endpoint runs; this
parser hands each chunk to a storage `Writer` as it arrives (a local temporary name, or the parts of
an S3 multipart upload) and stops at the size cap. Parsing and writing run in the threadpool, about a
MiB of body at a time, so neither disk nor network I/O blocks the event loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.core.errors import InvalidRequest, PayloadTooLarge
from service.core.storage import Writer

MAX_FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024
BATCH_BYTES = 1024 * 1024


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""


class _Receiver:
    def __init__(self, out: Writer, limit: int) -> None:
        self.out, self.limit = out, limit
        self.upload = Upload()
        self._digest = hashlib.sha256()
        self._header_field = b""
        self._header_value = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._name, self._is_file, self._value = None, False, bytearray()

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, options = parse_options_header(self._header_value)
            self._name = options.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in options:
                self._is_file = True
                self.upload.filename = options[b"filename"].decode("utf-8", "replace")
        self._header_field, self._header_value = b"", b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._name!r} is too long", param=self._name)
            return
        self._check_file_part()
        self.upload.bytes += len(chunk)
        if self.upload.bytes > self.limit:
            raise PayloadTooLarge(
                f"File is larger than this server's upload limit of {self.limit} bytes (RFT_MAX_UPLOAD_BYTES).",
                param="file",
            )
        self._digest.update(chunk)
        self.out.write(chunk)

    def _check_file_part(self) -> None:
        if self._name != "file":
            raise InvalidRequest(f"Unexpected file field {self._name!r}; send the file as 'file'.", param=self._name)
        if self.upload.sha256:
            raise InvalidRequest("Send exactly one file per upload.", param="file")

    def _part_end(self) -> None:
        if self._is_file:
            self._check_file_part()  # an empty file part has no data
            self.upload.sha256 = self._digest.hexdigest()
        elif self._name is not None:
            self.upload.fields[self._name] = self._value.decode("utf-8", "replace")


async def receive_upload(request: Request, out: Writer, limit: int) -> Upload:
    """Parse a multipart body, writing its `file` part to `out` (not yet committed: the caller checks
    the form first). On any error `out` is aborted."""
    try:
        return await _receive(request, out, limit)
    except BaseException:
        await run_in_threadpool(out.abort)
        raise


async def _receive(request: Request, out: Writer, limit: int) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest("Uploads must be multipart/form-data with 'file' and 'purpose' fields.")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"Request body of {declared} bytes exceeds this server's upload limit of {limit} bytes "
            "(RFT_MAX_UPLOAD_BYTES).",
            param="file",
        )
    receiver = _Receiver(out, limit)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
    try:
        batch = bytearray()
        async for chunk in request.stream():
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await run_in_threadpool(parser.write, bytes(batch))
                batch.clear()
        await run_in_threadpool(parser.write, bytes(batch))
        parser.finalize()
    except ParseError as exc:
        raise InvalidRequest(f"The multipart/form-data body is malformed: {exc}.") from None
    if not receiver.upload.sha256:
        raise InvalidRequest("Missing the 'file' field: send the file as multipart field 'file'.", param="file")
    return receiver.upload
