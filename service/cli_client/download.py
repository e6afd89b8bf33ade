"""`rft checkpoints download`: a resumable, verified download of a model archive, and safe extraction.

The server sends an uncompressed tar with `ETag: "<sha256>"`, `X-Checksum-SHA256` and byte ranges.
Bytes land in `<out>.part`; the ETag they belong to is kept beside it in `<out>.part.etag`, so a
later run asks for the rest with `Range` + `If-Range` and gets either a 206 (append) or, when the
archive changed, a 200 (start over). Only a file whose sha256 matches is renamed to `<out>`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

import httpx2

from service.cli_client.api import Api, CliError, raise_for_error
from service.cli_client.progress import StatusLine, bar, duration, mib

CHUNK = 1 << 20


def archive_path(job_id: str, checkpoint_id: str | None) -> str:
    """The server path of a checkpoint's archive, or of the job's final model."""
    if checkpoint_id:
        return f"fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content"
    return f"fine_tuning/jobs/{job_id}/content"


def download(api: Api, path: str, out: Path, *, merged: bool = False) -> str:
    """Download `path` to `out`, resuming `<out>.part`; returns the verified sha256."""
    part, tag = out.with_name(out.name + ".part"), out.with_name(out.name + ".part.etag")
    try:
        digest, expected = _fetch(api, path, {"merged": "true"} if merged else {}, part, tag)
    except httpx2.HTTPError as exc:
        kept = part.stat().st_size if part.exists() else 0
        raise CliError(
            f"download interrupted after {mib(kept)} ({exc}); run the same command again to resume"
        ) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted; {part} is kept, run the same command again to resume", file=sys.stderr)
        raise
    if expected and digest != expected:
        part.unlink(missing_ok=True)
        tag.unlink(missing_ok=True)
        raise CliError(f"checksum mismatch for {out.name}: the server announced sha256 {expected}, got {digest}")
    if not expected:
        print("warning: the server sent no checksum; the download is not verified", file=sys.stderr)
    os.replace(part, out)
    tag.unlink(missing_ok=True)
    return digest


def _fetch(api: Api, path: str, params: dict[str, str], part: Path, tag: Path) -> tuple[str, str | None]:
    etag = tag.read_text().strip() if tag.exists() else ""
    offset = part.stat().st_size if etag and part.exists() else 0  # a partial of unknown origin is not resumed
    headers = api.headers()
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": etag}
    with api.http.stream("GET", api.url(path), params=params, headers=headers) as response:
        if response.status_code == 416 and offset:  # the partial is no prefix of this archive: start over
            part.unlink()
            tag.unlink()
            return _fetch(api, path, params, part, tag)
        raise_for_error(response)
        return _receive(response, part, tag, offset)


def _receive(response: httpx2.Response, part: Path, tag: Path, offset: int) -> tuple[str, str | None]:
    """Write the body to `part` (appending to a 206), hashing all of it; returns (sha256, expected)."""
    if response.status_code == 206:
        start, total = _content_range(response.headers.get("Content-Range", ""))
        if start != offset:
            raise CliError(f"the server resumed at byte {start}, not at {offset}; delete {part} and retry")
    else:  # 200: a fresh start, whether or not a partial was offered
        offset, total = 0, _int(response.headers.get("Content-Length"))
    etag = response.headers.get("ETag")
    if etag:
        tag.write_text(etag)
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as existing:
            for block in iter(lambda: existing.read(CHUNK), b""):
                digest.update(block)
    meter = _Meter(part.name.removesuffix(".part"), offset, total)
    with open(part, "ab" if offset else "wb") as f:
        for block in response.iter_bytes():  # as they arrive: a dropped connection loses nothing received
            f.write(block)
            digest.update(block)
            meter.advance(len(block))
    meter.finish()
    size = part.stat().st_size
    if total is not None and size != total:
        raise CliError(f"the connection closed after {size} of {total} bytes; run the same command again to resume")
    return digest.hexdigest(), _expected_sha256(response.headers)


def _content_range(value: str) -> tuple[int, int | None]:
    """`bytes 100-199/200` -> (100, 200)."""
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-")[0]), None if total in ("", "*") else int(total)
    except ValueError:
        raise CliError(f"the server answered 206 with an unreadable Content-Range {value!r}") from None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _expected_sha256(headers: httpx2.Headers) -> str | None:
    checksum = headers.get("X-Checksum-SHA256")
    if not checksum:  # the ETag is the sha256 too, when it is a strong one
        etag = headers.get("ETag", "")
        checksum = etag.strip('"') if not etag.startswith("W/") else ""
    checksum = checksum.strip().lower()
    return checksum if len(checksum) == 64 and all(c in "0123456789abcdef" for c in checksum) else None


class _Meter:
    """Bytes, rate and ETA on one redrawn stderr line (TTY only), at most ten redraws a second."""

    def __init__(self, name: str, done: int, total: int | None) -> None:
        self.name, self.done, self.total, self.start_done = name, done, total, done
        self.line, self.started, self.drawn = StatusLine(sys.stderr), time.monotonic(), 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.drawn >= 0.1:
            self.drawn = now
            self.draw(now)

    def draw(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.started, 1e-6)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else None
            self.line.show(
                f"{self.name} {bar(self.done / self.total)} {100 * self.done / self.total:3.0f}%  "
                f"{mib(self.done)} / {mib(self.total)}  {mib(rate)}/s  ETA {duration(eta)}"
            )
        else:
            self.line.show(f"{self.name}  {mib(self.done)}  {mib(rate)}/s")

    def finish(self) -> None:
        self.draw(time.monotonic())
        self.line.done()


def extract(archive: Path, dest: Path) -> int:
    """Unpack `archive` into `dest`; refuses absolute or `..` member names. Returns the member count."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts or member.name.startswith("\\"):
                    raise CliError(f"{archive} holds an unsafe member {member.name!r}; nothing was extracted")
            dest.mkdir(parents=True, exist_ok=True)
            # The "data" filter is the second wall: it also refuses links out of `dest` and device files.
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise CliError(f"cannot extract {archive}: {exc}") from None
    return len(members)
