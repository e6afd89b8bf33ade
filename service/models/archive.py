"""Downloadable archives of checkpoints: an uncompressed tar of a Hugging Face model directory.

An archive is built once per checkpoint (and once more for a LoRA checkpoint merged into full
weights) from a local copy of it, then stored under the checkpoint's own key (its digest after it),
so it disappears with the checkpoint when that is pruned. The tar is byte-for-byte deterministic (sorted
names, the checkpoint's own write time on every member, no owners), so its sha256 is a stable ETag
and a broken download can be resumed with `Range` against the same bytes. Trainer state (optimizer,
RNG) is never shipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service.core.private import make_tree_private, open_private, private_dir
from service.core.settings import Settings
from service.core.storage import Storage
from service.models.registry import SMOLLM2

ARCHIVE_DIR = ".archive"
SKIPPED = {"trainer_state.pt", ARCHIVE_DIR}
# Where the base of a LoRA adapter can be found outside this service (PeftModel reads this field).
PUBLIC_BASE = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_build_lock = threading.Lock()


@dataclass(frozen=True)
class Archive:
    key: str  # the tar's storage key
    sha256: str
    size: int
    filename: str


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def archive_of(storage: Storage, key: str, settings: Settings, *, merged: bool, name: str) -> Archive:
    """The archive of checkpoint folder `key`, built on first use and stored beside it (under its
    key, so it goes when the checkpoint goes). `merged` only matters for LoRA."""
    with _build_lock:  # one build at a time: merging loads a model, and two copies gain nothing
        folder = None
        if merged and not storage.exists(f"{key}/{ARCHIVE_DIR}/model-merged.sha256"):
            folder = storage.local_dir(key)
            merged = is_adapter(folder)
        stem = "model-merged" if merged else "model"
        tar, digest = f"{key}/{ARCHIVE_DIR}/{stem}.tar", f"{key}/{ARCHIVE_DIR}/{stem}.sha256"
        if not storage.exists(digest):
            _build(storage, folder or storage.local_dir(key), (tar, digest), merged, settings)
        sha256, size = storage.read_bytes(digest).decode().strip(), storage.size(tar)
    if size is None:
        raise FileNotFoundError(tar)
    return Archive(tar, sha256, size, f"{name}{'-merged' if merged else ''}.tar")


def _build(storage: Storage, folder: Path, keys: tuple[str, str], merged: bool, settings: Settings) -> None:
    """Write the tar beside a local copy of the checkpoint, then store it and, last, its digest."""
    source = _merged_dir(folder, settings) if merged else folder
    partial = private_dir(folder / ARCHIVE_DIR) / f".{uuid.uuid4().hex}.partial"
    try:
        sha256 = _write_archive(source, partial, mtime=_written_at(folder))
        storage.put_file(keys[0], partial)
        storage.put_bytes(keys[1], (sha256 + "\n").encode())
    finally:
        partial.unlink(missing_ok=True)
        if merged:
            shutil.rmtree(source, ignore_errors=True)


def _written_at(folder: Path) -> int:
    """When the checkpoint was written (its files never change after that), for the tar members."""
    return int(max(f.stat().st_mtime for f in folder.iterdir() if f.is_file()))


def _merged_dir(folder: Path, settings: Settings) -> Path:
    """The adapter merged into its base, saved as a plain Hugging Face directory beside it."""
    from service.models.registry import merged_adapter

    model, tokenizer = merged_adapter(folder, settings)
    out = private_dir(folder / ARCHIVE_DIR / f"merged-{uuid.uuid4().hex}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tree_private(out)
    return out


def _write_archive(source: Path, target: Path, mtime: int) -> str:
    """Write the tar of `source` to `target` (fsynced); its sha256."""
    with open_private(target) as raw:
        hashing = _HashingWriter(raw)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for file in sorted(p for p in source.iterdir() if p.name not in SKIPPED and p.is_file()):
                _add(tar, file, mtime)
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.hexdigest()


def _add(tar: tarfile.TarFile, file: Path, mtime: int) -> None:
    info = tarfile.TarInfo(file.name)
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, mtime, 0, 0, "", ""
    if file.name == "adapter_config.json":
        data = _public_adapter_config(file)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return
    info.size = file.stat().st_size
    with open(file, "rb") as f:
        tar.addfile(info, f)


def _public_adapter_config(file: Path) -> bytes:
    """Name the adapter's base as the world knows it, so `PeftModel.from_pretrained` finds it."""
    config = json.loads(file.read_text())
    base = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = PUBLIC_BASE.get(base, base)
    return json.dumps(config, indent=2).encode()


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.hash = raw, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()
