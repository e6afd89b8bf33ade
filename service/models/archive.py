"""Downloadable archives of checkpoints: an uncompressed tar of a Hugging Face model directory.

An archive is built once per checkpoint (and once more for a LoRA checkpoint merged into full
weights), written to a temporary name, fsynced and renamed inside the checkpoint's own folder, so it
disappears with the checkpoint when that is pruned. The tar is byte-for-byte deterministic (sorted
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

from service.core.private import make_tree_private, open_private, private_dir, write_private
from service.core.settings import Settings
from service.models.registry import SMOLLM2

ARCHIVE_DIR = ".archive"
SKIPPED = {"trainer_state.pt", ARCHIVE_DIR}
# Where the base of a LoRA adapter can be found outside this service (PeftModel reads this field).
PUBLIC_BASE = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_build_lock = threading.Lock()


@dataclass(frozen=True)
class Archive:
    path: Path
    sha256: str
    filename: str


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def archive_of(folder: Path, settings: Settings, *, merged: bool, name: str) -> Archive:
    """The archive of a checkpoint folder, built on first use. `merged` only matters for LoRA."""
    merged = merged and is_adapter(folder)
    stem = "model-merged" if merged else "model"
    target = folder / ARCHIVE_DIR / f"{stem}.tar"
    digest = target.with_suffix(".sha256")
    with _build_lock:  # one build at a time: merging loads a model, and two copies gain nothing
        if not digest.exists():
            source = _merged_dir(folder, settings) if merged else folder
            try:
                _write_archive(source, target, digest, mtime=_written_at(folder))
            finally:
                if merged:
                    shutil.rmtree(source, ignore_errors=True)
    return Archive(target, digest.read_text().strip(), f"{name}{'-merged' if merged else ''}.tar")


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


def _write_archive(source: Path, target: Path, digest: Path, mtime: int) -> None:
    private_dir(target.parent)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        with open_private(partial) as raw:
            hashing = _HashingWriter(raw)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for file in sorted(p for p in source.iterdir() if p.name not in SKIPPED and p.is_file()):
                    _add(tar, file, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, target)
        write_private(digest, (hashing.hexdigest() + "\n").encode())
    finally:
        partial.unlink(missing_ok=True)


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
