"""A worker's report of itself to the fleet (service/fleet): what it has, in a heartbeat row.

The main process of `rft worker` probes its devices once (in a subprocess: CUDA must not be
initialised in a process that forks the pool children which train) and then renews its row every
`RFT_HEARTBEAT_SECONDS` from a thread, on a connection of its own that is never pooled (so no child
inherits it across the fork). The job a pool child runs is written on the row by that child
(`workers/runner.py`). On a clean exit the row goes; a worker killed with its host stays listed,
unhealthy, and the router stops choosing it once its heartbeat is stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from service.core.db import make_engine, transaction
from service.core.settings import Settings
from service.fleet import repository
from service.fleet.throughput import device_name
from service.jobs.integrations import installed_trackers
from service.models.engines import vllm_unavailable
from service.models.memory_plan import GIB, host_memory

log = logging.getLogger(__name__)
PROBE = (
    "import json, torch; c = torch.cuda.is_available(); "
    "print(json.dumps({'count': torch.cuda.device_count() if c else 0, "
    "'memory': torch.cuda.get_device_properties(0).total_memory if c else 0, "
    "'name': torch.cuda.get_device_name(0) if c else None}))"
)


def main_worker_id(pid: int | None = None) -> str:
    """The id of the `rft worker` process `pid` (this one by default; a pool child passes its parent's)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def capabilities(settings: Settings, queues: list[str]) -> dict[str, Any]:
    """What this worker can run: its devices (RFT_WORKER_DEVICES overrides their count), one device's
    memory (RFT_WORKER_MEMORY_GIB overrides it; a CPU's share of the host's), its rollout engines and
    queues."""
    devices: dict[str, Any] = {"count": 0, "memory": 0, "name": None}
    if any(q.startswith("training") for q in queues):
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            devices = json.loads(probe.stdout.strip().splitlines()[-1])
        else:
            log.warning("device probe failed; reporting this worker as CPU only: %s", probe.stderr[-500:])
    cuda = devices["count"] > 0
    count = settings.worker_devices or max(1, int(devices["count"]))  # as workers.rl.launch.worker_devices
    memory = int(devices["memory"]) if cuda else host_memory() // count  # a CPU's ranks share its memory
    if settings.worker_memory_gib:
        memory = int(settings.worker_memory_gib * GIB)
    return {
        "hostname": socket.gethostname(),
        "queues": queues,
        "device_type": "cuda" if cuda else "cpu",
        "device_count": count,
        "device_memory_bytes": memory,
        "engines": ["torch"] + (["vllm"] if vllm_unavailable(settings, "") is None else []),
        "device_name": device_name(devices.get("name") if cuda else None),
        "trackers": installed_trackers(),
    }


class FleetReporter:
    def __init__(self, settings: Settings, worker_id: str, queues: list[str]) -> None:
        self.settings, self.worker_id = settings, worker_id
        self.capabilities = capabilities(settings, queues)
        self._sessions = sessionmaker(bind=make_engine(settings.sqlalchemy_url, poolclass=NullPool))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-heartbeat", daemon=True)

    def start(self) -> None:
        self._report()  # the row exists before the first task is taken
        self._thread.start()

    def _report(self) -> None:
        with transaction(self._sessions) as session:
            repository.report(session, self.worker_id, time.time(), **self.capabilities)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self._report()
            except Exception:  # the database is restarting, say: the next beat tries again
                log.warning("fleet heartbeat of %s failed", self.worker_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            with transaction(self._sessions) as session:
                repository.remove(session, self.worker_id)
        except Exception:
            log.warning("could not remove the fleet row of %s; it goes stale instead", self.worker_id, exc_info=True)
