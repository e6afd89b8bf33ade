"""Reading a W&B run file (`run-<id>.wandb`) back, as `wandb sync` would upload it.

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of
records, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and a
piece of one serialised `wandb_internal_pb2.Record`. wandb ships no Python reader of it any more."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> dict[int, dict[str, Any]]:
    """Each logged step's values, by step."""
    steps: dict[int, dict[str, Any]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            steps[int(row["_step"])] = row
    return steps


def config(path: Path) -> dict[str, Any]:
    """The run's configuration, its updates applied in order."""
    out: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def summary(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
