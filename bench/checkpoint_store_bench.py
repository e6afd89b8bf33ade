"""Checkpoint write and restore, the local folder vs an S3 bucket: SmolLM2-135M, full and LoRA.

    python bench/checkpoint_store_bench.py [--modes full lora] [--repeats 3]

Side by side in one run, for each mode and store:
- write: the trainer's own writer (workers/rl/checkpoint.py: safetensors weights, tokenizer, and
  optimizer, scheduler and RNG state) into a staging folder, then `commit_dir` (local: fsync and
  rename; S3: every object uploaded, then the manifest);
- restore: a host with an empty cache fetches the folder (`local_dir`: local is a no-op, S3 downloads
  and checks each object's sha256) and `load_into` puts it into a fresh model and optimizer, as a
  resumed job does.
The optimizer state is real: one AdamW step on every trainable weight before the first write. S3 is
moto's server over HTTP on this machine (objects in its memory): network-free, so read its figures as
the cost of the S3 protocol, checksums and copies, not of a real network. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import torch

from service.core.settings import Settings
from service.core.storage import Storage, storage_for
from service.models.registry import SMOLLM2
from workers.rl import checkpoint
from workers.rl.config import resolve
from workers.rl.policy import build_policy, trainable
from workers.rl.state import TrainerState

KEYS = {"s3_access_key_id": "bench", "s3_secret_access_key": "bench-secret", "s3_region": "us-east-1"}


class Ctx:
    """What `checkpoint.save` needs of a JobContext: the job's model name and a storage commit."""

    def __init__(self, storage: Storage) -> None:
        self.storage, self.job = storage, {"model": SMOLLM2}

    def save_checkpoint(self, step: int, write: Any, metrics: dict[str, Any]) -> str:
        key = f"checkpoints/bench/{uuid.uuid4().hex[:8]}/step-{step:06d}"
        staging = self.storage.staging_dir(key)
        write(staging)
        self.storage.commit_dir(staging, key)
        return key


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}")
            break
        except httpx.HTTPError:
            assert time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
    httpx.put(f"http://127.0.0.1:{port}/bench").raise_for_status()
    return proc


def trained_parts(mode: str, settings: Settings) -> tuple[Any, Any, Any, Any]:
    hp = {"lora_rank": 16} if mode == "lora" else {}
    cfg = resolve(hp, 8)
    model, tokenizer = build_policy(SMOLLM2, cfg, settings, "cpu", seed=0)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for p in trainable(model):
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    return cfg, model, tokenizer, (optimizer, scheduler)


def measure(mode: str, store: str, settings: Settings, repeats: int) -> str:
    cfg, model, tokenizer, (optimizer, scheduler) = trained_parts(mode, settings)
    storage = storage_for(settings)
    writes, restores, size = [], [], 0
    for i in range(repeats):
        t0 = time.perf_counter()
        key = checkpoint.save(Ctx(storage), 1, model, tokenizer, optimizer, scheduler, TrainerState(), {})  # type: ignore[arg-type]
        writes.append(time.perf_counter() - t0)
        fresh = storage_for(settings.model_copy(update={"cache_root": settings.data_dir / f"host-{i}"}))
        _, model2, _, (optimizer2, scheduler2) = trained_parts(mode, settings)
        t0 = time.perf_counter()
        folder = fresh.local_dir(key)
        checkpoint.load_into(folder, model2, optimizer2, scheduler2)
        restores.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        storage.delete(key)
    return (
        f"{mode:<5} {store:<6} {size / 2**20:8.1f} MiB   write {statistics.median(writes):6.2f} s   "
        f"restore {statistics.median(restores):6.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    torch.manual_seed(0)
    moto = start_moto(args.port)
    work = Path(tempfile.mkdtemp(prefix="rft-ckpt-bench-", dir="/var/tmp"))
    try:
        for mode in args.modes:
            for store in ("local", "s3"):
                settings = Settings(data_dir=work / f"{mode}-{store}")
                if store == "s3":
                    url = f"s3://bench/{mode}"
                    endpoint = f"http://127.0.0.1:{args.port}"
                    settings = settings.model_copy(update={"storage_url": url, "s3_endpoint_url": endpoint, **KEYS})
                print(measure(mode, store, settings, args.repeats), flush=True)
    finally:
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
