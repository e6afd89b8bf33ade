"""Where the bytes live: one interface over a local folder (the default) and an S3-compatible store.

Keys are built from our own ids, never from user input. Both backends give the same guarantees:
- an upload streams through a `Writer` in constant memory and appears under its key only on
  `commit()` (local: fsync and rename; S3: a multipart upload completed at the end);
- a checkpoint folder is visible only once all of it is written (local: rename of the fsynced
  staging folder; S3: its objects, then a manifest naming each one's size and sha256). The caller
  records the database row after `commit_dir` returns: the row is the commit point;
- `delete` removes the bytes (an object, or a folder's every object) and any local copy;
- reads stream in chunks, by byte range.
Code that needs a real path (training, loading a model, building an archive) asks for a local
copy: the stored path itself locally, a verified download into `cache_dir` from S3.

Locally every folder is 0700 and every object 0600 (`service.core.private`), whatever the umask.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from service.core.private import make_tree_private, open_private, private_dir
from service.core.settings import Settings

_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_.\-]+)*$")
CHUNK = 1024 * 1024


def job_folder(project_id: str, job_id: str) -> str:
    """The storage key under which everything a job writes lives (its checkpoints and their archives)."""
    return f"checkpoints/{project_id}/{job_id}"


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Writer(ABC):
    """One object being written: `write` chunks, then `commit` (it appears) or `abort` (it never does)."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class Storage(ABC):
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    @abstractmethod
    def writer(self, key: str) -> Writer: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a finished local file under `key`; `path` is consumed (moved or uploaded, then removed)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        out = self.writer(key)
        try:
            out.write(data)
            out.commit()
        except BaseException:
            out.abort()
            raise

    @abstractmethod
    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes of `key` from `start` to `end` inclusive (None: the last), in chunks."""

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_bytes(key))

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None where there is none."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object, or every object under a folder key, and any local copy of it."""

    def staging_dir(self, key: str) -> Path:
        """An empty private local folder, beside where `key`'s local copy goes, to write its future
        contents into (the same filesystem, so committing locally is a rename)."""
        target = self.local_path(key)
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        return private_dir(staging)

    @abstractmethod
    def commit_dir(self, staging: Path, key: str) -> None:
        """Make a fully written staging folder the contents of `key`, all of it or none."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """Where a local copy of `key` is or would be, without fetching it."""

    @abstractmethod
    def local_file(self, key: str, sha256: str | None = None) -> Path:
        """A local copy of object `key` to read (checked against `sha256` where given)."""

    @abstractmethod
    def local_dir(self, key: str) -> Path:
        """A local copy of committed folder `key`; FileNotFoundError where none was committed."""

    def drop_local(self, key: str) -> None:  # noqa: B027 (locally the copy is the object itself)
        """Remove this host's copy of `key` (an object or a folder), keeping the stored one."""

    def download_url(self, key: str, filename: str) -> str | None:
        """A URL the client can fetch `key` from directly (presigned), or None to stream it ourselves."""
        return None

    def check(self) -> None:  # noqa: B027 (most stores have nothing to check)
        """Raise a clear error now if the store cannot be used (called at start-up)."""


class LocalStorage(Storage):
    """Objects are files under `root`. Writes go to a temporary name beside the target, are fsynced and
    renamed, so a crash leaves either the old object or the new one, never half of one."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)
        super().__init__(self.root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def writer(self, key: str) -> Writer:
        return _LocalWriter(self.upload_target(key), self.path(key))

    def put_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        private_dir(target.parent)
        os.replace(path, target)

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with open(self.path(key), "rb") as f:
            f.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def commit_dir(self, staging: Path, key: str) -> None:
        target = self.path(key)
        private_dir(target.parent)
        make_tree_private(staging)  # the trainer's libraries wrote these under the process umask
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def local_file(self, key: str, sha256: str | None = None) -> Path:
        return self.path(key)

    def local_dir(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_dir():
            raise FileNotFoundError(f"no stored folder {key!r}")
        return path

    def upload_target(self, key: str) -> Path:
        """The temporary name an upload to `key` streams into, in a private folder beside it."""
        target = self.path(key)
        private_dir(target.parent)
        return target.with_name(f".{target.name}.partial")


class _LocalWriter(Writer):
    def __init__(self, partial: Path, target: Path) -> None:
        self.partial, self.target = partial, target
        self._out: IO[bytes] = open_private(partial)

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def commit(self) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self._out.close()
        self.partial.unlink(missing_ok=True)


def storage_for(settings: Settings) -> Storage:
    """The store the settings name: `RFT_STORAGE_URL` (s3://bucket/prefix), else the local folder."""
    if settings.storage_url:
        from service.core.s3 import S3Storage

        return S3Storage.of(settings)
    return LocalStorage(settings.storage_dir)
