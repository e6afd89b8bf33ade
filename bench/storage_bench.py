"""Big uploads and checkpoint downloads at constant server memory: a real `rft serve` process.

    python bench/storage_bench.py [--sizes-mb 64 512] [--stores local s3]

For each store (the local folder, then an S3 bucket on moto's S3 server over HTTP, started here) and
each size, side by side in one run: upload a JSONL file of that many MiB (POST /v1/files,
streamed multipart), then download a checkpoint archive of about that size twice (the first GET
builds the tar, the second serves the built one). The server's resident memory is sampled from
/proc/<pid>/status every 20 ms; each phase reports its throughput and the peak RSS above the
server's RSS just before it, and the run ends with the server's VmHWM (its lifetime peak).

The checkpoint is put in place as the trainer would leave it (a row in the server's SQLite database
and a folder with a `model.safetensors` of random bytes under storage), so no training runs: what is
measured is the storage and HTTP path only. The data folder is under /var/tmp and removed at the end.
With S3 the server keeps nothing but its cache: the tar is built there from a fetched copy of the
checkpoint, stored in the bucket, and every download streams from the bucket. moto keeps objects in
its own memory, so it is slower than MinIO or S3 would be: read the S3 figures as a floor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.storage import storage_for
from service.core.tables import Checkpoint, Job, Project

MIB = 1024 * 1024
CLI = [sys.executable, "-m", "service.cli"]
LINE = (json.dumps({"messages": [{"role": "user", "content": "x" * 900}], "answer": "y"}) + "\n").encode()


class RssSampler:
    """The peak VmRSS (kB) of `pid` between `start()` and `stop()`, sampled from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread: threading.Thread | None = None

    def read(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def start(self) -> int:
        self.peak, before = 0, self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return before

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        return max(self.peak, self.read())


def write_jsonl(path: Path, size: int) -> str:
    """A valid RFT JSONL file of exactly `size` bytes (the last line padded); its sha256."""
    digest = hashlib.sha256()
    block = LINE * (MIB // len(LINE))
    with open(path, "wb") as f:
        written = 0
        while written + len(block) <= size - len(LINE) * 2:
            f.write(block)
            digest.update(block)
            written += len(block)
        while written + 2 * len(LINE) <= size:
            f.write(LINE)
            digest.update(LINE)
            written += len(LINE)
        pad = size - written - 1  # one last line of JSON padded with spaces to the exact size
        last = (json.dumps({"messages": [{"role": "user", "content": "z"}]}).ljust(pad) + "\n").encode()
        f.write(last)
        digest.update(last)
    return digest.hexdigest()


def place_checkpoint(settings: Settings, size: int) -> tuple[str, str]:
    """A finished job with one checkpoint folder holding `size` bytes of weights: (job id, ckpt id)."""
    job_id, ckpt_id = f"ftjob-bench{uuid.uuid4().hex[:12]}", f"ftckpt-bench{uuid.uuid4().hex[:12]}"
    with unit_of_work(settings) as session:
        project = session.query(Project).filter(Project.name == "bench").one()
        key = f"checkpoints/{project.id}/{job_id}/step-000001"
        storage = storage_for(settings)
        staging = storage.staging_dir(key)
        with open(staging / "model.safetensors", "wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
        (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
        storage.commit_dir(staging, key)
        session.add(
            Job(
                id=job_id,
                project_id=project.id,
                model="tiny-random-llama",
                training_file="file-none",
                seed=1,
                method={"type": "reinforcement"},
                status="succeeded",
                result_files=[],
            )
        )
        session.flush()
        session.add(
            Checkpoint(
                id=ckpt_id,
                project_id=project.id,
                job_id=job_id,
                step_number=1,
                fine_tuned_model_checkpoint=f"ft:bench:{job_id}:ckpt-step-1",
                metrics={},
                storage_key=key,
            )
        )
    return job_id, ckpt_id


def chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(MIB):
            yield block


def phase(sampler: RssSampler, name: str, size: int, run: object) -> None:
    before = sampler.start()
    started = time.perf_counter()
    detail = run()  # type: ignore[operator]
    elapsed = time.perf_counter() - started
    peak = sampler.stop()
    print(
        f"  {name:<22} {size / MIB:7.0f} MiB in {elapsed:6.2f}s = {size / MIB / elapsed:7.1f} MiB/s; "
        f"server RSS {before / 1024:6.1f} MiB before, peak {peak / 1024:6.1f} MiB "
        f"(+{(peak - before) / 1024:5.1f} MiB) {detail}",
        flush=True,
    )


def bench_size(http: httpx.Client, sampler: RssSampler, settings: Settings, work: Path, mib: int) -> None:
    size = mib * MIB
    source = work / f"train-{mib}.jsonl"
    expected = write_jsonl(source, size)
    print(f"{mib} MiB:", flush=True)

    def up() -> str:
        with open(source, "rb") as f:
            response = http.post("/files", files={"file": (source.name, f)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        assert response.json()["sha256"] == expected and response.json()["bytes"] == size
        return "(sha256 matches)"

    phase(sampler, "upload", size, up)
    source.unlink()
    job_id, ckpt_id = place_checkpoint(settings, size)

    def down() -> str:
        received, digest = 0, hashlib.sha256()
        with http.stream("GET", f"/fine_tuning/jobs/{job_id}/checkpoints/{ckpt_id}/content") as response:
            assert response.status_code == 200, response.read()
            for block in response.iter_bytes(MIB):
                received += len(block)
                digest.update(block)
            assert digest.hexdigest() == response.headers["x-checksum-sha256"]
        return f"({received / MIB:.1f} MiB tar, sha256 matches)"

    phase(sampler, "download (builds tar)", size, down)
    phase(sampler, "download (built tar)", size, down)


def wait_healthy(server: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.HTTPError:
            assert time.time() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.2)


S3_KEYS = {"RFT_S3_ACCESS_KEY_ID": "bench", "RFT_S3_SECRET_ACCESS_KEY": "bench-secret", "RFT_S3_REGION": "us-east-1"}


def start_s3(work: Path, port: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's S3 server with one bucket; the settings that point rft at it."""
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(endpoint)
            break
        except httpx.HTTPError:
            assert time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
    httpx.put(f"{endpoint}/bench").raise_for_status()  # create the bucket (moto takes it unsigned)
    return proc, {"RFT_STORAGE_URL": "s3://bench/rft", "RFT_S3_ENDPOINT_URL": endpoint, **S3_KEYS}


def bench_store(store: str, args: argparse.Namespace, work: Path) -> None:
    data = work / store
    env = {**os.environ, "RFT_DATA_DIR": str(data), "RFT_DATABASE_URL": "", "RFT_BROKER_URL": ""}
    extra: dict[str, str] = {}
    s3 = None
    if store == "s3":
        s3, extra = start_s3(work, args.port + 1)
        env |= extra
    settings = Settings(env="dev", data_dir=data, database_url="", broker_url="")
    settings = settings.model_copy(update={k.removeprefix("RFT_").lower(): v for k, v in extra.items()})
    log = open(work / f"serve-{store}.log", "wb")
    serve = [*CLI, "serve", "--no-workers", "--port", str(args.port)]
    server = subprocess.Popen(serve, env=env, stdout=log, stderr=log)
    try:
        wait_healthy(server, args.port, work / f"serve-{store}.log")
        key = subprocess.run(
            [*CLI, "keys", "create", "--project", "bench"], env=env, capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        sampler = RssSampler(server.pid)
        print(
            f"[{store}] rft serve (pid {server.pid}, SQLite, {os.cpu_count()} CPUs), "
            f"RSS {sampler.read() / 1024:.1f} MiB"
        )
        headers = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{args.port}/v1"
        with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
            for mib in args.sizes_mb:
                bench_size(http, sampler, settings, work, mib)
        print(f"[{store}] server VmHWM (lifetime peak RSS): {sampler.read('VmHWM') / 1024:.1f} MiB")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        if s3 is not None:
            s3.terminate()
            s3.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    work = Path("/var/tmp") / f"rft-storage-bench-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        for store in args.stores:
            bench_store(store, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
