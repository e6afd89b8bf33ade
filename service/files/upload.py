"""Streaming multipart upload: the file part goes straight to storage, hashed on the way.

Starlette's form parser spools the whole body to a temporary file before the endpoint runs; this
parser writes each chunk to the object's temporary name as it arrives and stops at the size cap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.core.errors import InvalidRequest, PayloadTooLarge
from service.core.private import open_private

MAX_FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""


class _Receiver:
    def __init__(self, target: Path, limit: int) -> None:
        self.target, self.limit = target, limit
        self.upload = Upload()
        self._digest = hashlib.sha256()
        self._header_field = b""
        self._header_value = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._out: IO[bytes] | None = None

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
        if self._name != "file":
            raise InvalidRequest(f"Unexpected file field {self._name!r}; send the file as 'file'.", param=self._name)
        if self.upload.sha256:
            raise InvalidRequest("Send exactly one file per upload.", param="file")
        if self._out is None:
            self._out = open_private(self.target)
        self.upload.bytes += len(chunk)
        if self.upload.bytes > self.limit:
            raise PayloadTooLarge(
                f"File is larger than this server's upload limit of {self.limit} bytes (RFT_MAX_UPLOAD_BYTES).",
                param="file",
            )
        self._digest.update(chunk)
        self._out.write(chunk)

    def _part_end(self) -> None:
        if self._is_file:
            if self._out is None:  # an empty file part
                self._out = open_private(self.target)
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self.upload.sha256 = self._digest.hexdigest()
        elif self._name is not None:
            self.upload.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None and not self._out.closed:
            self._out.close()


async def receive_upload(request: Request, target: Path, limit: int) -> Upload:
    """Parse a multipart body, writing its `file` part to `target`. On any error `target` is removed."""
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
    receiver = _Receiver(target, limit)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except BaseException as exc:
        receiver.close()
        target.unlink(missing_ok=True)
        if isinstance(exc, ParseError):
            raise InvalidRequest(f"The multipart/form-data body is malformed: {exc}.") from None
        raise
    finally:
        receiver.close()
    if not receiver.upload.sha256:
        target.unlink(missing_ok=True)
        raise InvalidRequest("Missing the 'file' field: send the file as multipart field 'file'.", param="file")
    return receiver.upload
