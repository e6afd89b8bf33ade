"""Starting the other ranks of a job on several devices, and what every rank sees of its job.

`devices_for` resolves a job's `n_devices` against this worker. Rank 0, the job runner's own
process, opens a TCP store on a free loopback port, starts ranks 1..W-1 as `python -m
workers.rl.follower`, waits for them to join (noticing one that dies first), forms the process
group (gloo on CPUs, NCCL on GPUs, one device a rank) and sends them the job's row and the
settings: the followers never open the database or the object store. Every socket of the group
listens on loopback alone: its members exchange pickled objects, which must never come from
another host. `RankContext` is what the loop calls for the job's state on every rank: rank 0's
reads are broadcast to the others and its writes are its own. A follower dies with rank 0
(PR_SET_PDEATHSIG); rank 0 ends the followers when the job ends, however it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from workers.context import Control, JobContext, RankLost
from workers.rl.ranks import Ranks

DEVICES_PARAM = "method.reinforcement.hyperparameters.n_devices"
JOIN_SECONDS = 300.0  # a follower's start-up: importing torch and transformers on a loaded machine
LOG_LINES = 15  # of a failed follower's output, in the job's error


def worker_devices(settings: Settings) -> int:
    """The devices this worker offers one job: `RFT_WORKER_DEVICES`, else its CUDA devices, else 1."""
    if settings.worker_devices:
        return settings.worker_devices
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def devices_for(hyperparameters: dict[str, Any], settings: Settings) -> int:
    """The number of processes a job runs on this worker: its `n_devices`, `auto` being all it offers."""
    offered = worker_devices(settings)
    asked = hyperparameters.get("n_devices", "auto")
    if asked == "auto":
        return offered
    kind = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "a CPU"
    if int(asked) > offered or (torch.cuda.is_available() and int(asked) > torch.cuda.device_count()):
        raise InvalidRequest(
            f"n_devices {asked}: this worker offers {offered} ({kind}; RFT_WORKER_DEVICES={settings.worker_devices}). "
            f"Ask for at most {offered}, or 'auto', or run the job on a worker with more devices.",
            param=DEVICES_PARAM,
        )
    return int(asked)


class RankContext:
    """A `JobContext` as every rank sees it: rank 0 holds the real one (`inner`); its reads reach the
    other ranks by broadcast, and only it writes."""

    def __init__(self, ranks: Ranks, job: dict[str, Any], settings: Settings, inner: JobContext | None) -> None:
        self.ranks, self.job, self.settings, self.inner = ranks, job, settings, inner
        self.job_id = str(job["id"])

    @classmethod
    def of(cls, ctx: JobContext, ranks: Ranks) -> RankContext:
        return cls(ranks, ctx.job, ctx.settings, ctx)

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, dedupe_key: str | None = None
    ) -> None:
        if self.inner is not None:
            self.inner.event(message, level=level, data=data, dedupe_key=dedupe_key)

    def metrics(self, step: int, data: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.metrics(step, data)

    def update_job(self, **values: Any) -> None:
        if self.inner is not None:
            self.inner.update_job(**values)

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        return self.inner.save_checkpoint(step, write, metrics) if self.inner is not None else ""

    def prune_checkpoints(self, keep_steps: set[int]) -> None:
        if self.inner is not None:
            self.inner.prune_checkpoints(keep_steps)

    def control(self) -> Control | None:
        request: Control | None = self.ranks.broadcast(self.inner.control() if self.inner is not None else None)
        return request

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest checkpoint's step and local folder (rank 0's copy: the ranks share a host)."""
        latest: tuple[int, Path] | None = self.ranks.broadcast(
            self.inner.latest_checkpoint() if self.inner is not None else None
        )
        return latest


@contextlib.contextmanager
def ranks_of(ctx: JobContext, world: int, sharded: bool) -> Iterator[Ranks]:
    """Rank 0 of `world`, with ranks 1..world-1 started and joined, for the block."""
    import torch.distributed as dist

    timeout = ctx.settings.distributed_timeout_seconds
    listener = socket.create_server(("127.0.0.1", 0))  # TCPStore's own server would listen on every interface
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world,
        is_master=True,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store's from now on: it closes it
    )
    logs = Path(tempfile.mkdtemp(prefix=f"rft-ranks-{ctx.job_id}-"))
    followers = [_start(rank, world, port, timeout, logs) for rank in range(1, world)]
    ranks = Ranks(0, world, sharded, describe_failure=lambda: describe(followers, logs))
    threads, finished = torch.get_num_threads(), False
    try:
        _wait_for(followers, store, world, logs)
        join(store, 0, world, timeout)
        ranks.broadcast((ctx.job, ctx.settings, sharded))
        yield ranks
        finished = True
    finally:
        _stop(followers, grace=30.0 if finished else 0.0)
        torch.set_num_threads(threads)
        for log in logs.glob("*"):
            log.unlink()
        logs.rmdir()


def join(store: Any, rank: int, world: int, timeout: float) -> None:
    """Join the job's process group: NCCL with one GPU a rank, else gloo with the cores shared out."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"  # this host's ranks only
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if rank:
        store.set(f"ready/{rank}", "1")  # rank 0 waits for this, watching for a follower that dies first
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))


def _start(rank: int, world: int, port: int, timeout: float, logs: Path) -> subprocess.Popen[bytes]:
    args = [rank, world, port, timeout, os.getpid()]
    command = [sys.executable, "-m", "workers.rl.follower", *map(str, args)]
    with open(logs / f"rank-{rank}.log", "wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(followers: list[subprocess.Popen[bytes]], store: Any, world: int, logs: Path) -> None:
    """Until every follower is about to join the group (it sets `ready/<rank>` in the store), or one
    has died or none came in `JOIN_SECONDS`: then `RankLost`, with what it wrote."""
    deadline = time.monotonic() + JOIN_SECONDS
    waiting = set(range(1, world))
    while waiting:
        waiting = {r for r in waiting if not store.check([f"ready/{r}"])}
        dead = [p for p in followers if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RankLost(f"The job's other ranks did not start: {describe(followers, logs)}")
        time.sleep(0.05)


def describe(followers: list[subprocess.Popen[bytes]], logs: Path) -> str:
    """What rank 0 can tell of each other rank: running, or its exit and the end of its output."""
    lines = []
    for rank, proc in enumerate(followers, start=1):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # one that just died may not be reaped yet
        code = proc.poll()
        if code is None:
            lines.append(f"rank {rank} is running but did not answer")
            continue
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        log = logs / f"rank-{rank}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-LOG_LINES:] if log.exists() else []
        lines.append(f"rank {rank} {how}" + (": " + " | ".join(tail) if tail else ""))
    return "; ".join(lines)


def _stop(followers: list[subprocess.Popen[bytes]], grace: float) -> None:
    """End the process group and the followers: a clean end waits `grace` seconds for them to finish."""
    import torch.distributed as dist

    if dist.is_initialized():
        if grace == 0.0:  # a failed job: the followers may be waiting in a collective; end them first
            _kill(followers)
        dist.destroy_process_group()
    deadline = time.monotonic() + grace
    for proc in followers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    _kill(followers)


def _kill(followers: list[subprocess.Popen[bytes]]) -> None:
    for proc in followers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def die_with_parent(parent: int) -> None:
    """This process gets SIGKILL when `parent` ends (Linux), and ends now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
