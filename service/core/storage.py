"""Local object storage under one root. Keys are built from our own ids, never from user input.

Writes go to a temporary name in the same folder, are fsynced and renamed, so a crash leaves either
the old object or the new one, never half of one. Every folder is 0700 and every object 0600
(`service.core.private`), whatever the umask of the process that wrote it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from service.core.private import make_tree_private, private_dir

_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_.\-]+)*$")
CHUNK = 1024 * 1024


def job_folder(project_id: str, job_id: str) -> str:
    """The storage key under which everything a job writes lives (its checkpoints and their archives)."""
    return f"checkpoints/{project_id}/{job_id}"


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)

    def path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root / key

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def commit_dir(self, staging: Path, key: str) -> Path:
        """Move a fully written, fsynced staging folder to `key` atomically (a checkpoint, say)."""
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
        return target

    def staging_dir(self, key: str) -> Path:
        target = self.path(key)
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        return private_dir(staging)

    def upload_target(self, key: str) -> Path:
        """The temporary name an upload to `key` streams into, in a private folder beside it."""
        target = self.path(key)
        private_dir(target.parent)
        return target.with_name(f".{target.name}.partial")
