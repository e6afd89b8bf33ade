"""Status polling under load: `GET /v1/fine_tuning/jobs/{id}` on PostgreSQL, rft beside the thin app.

    python bench/status_poll_bench.py [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
                                      [--connections 10 50] [--duration 10] [--rounds 3] [--workers 2]

Creates a fresh database on that server (dropped at the end), applies the migrations, adds a project
key and a job row, then serves the same request from `uvicorn --workers N` twice: rft's app
(`service.app:create_app`) and `bench/thin_status_app.py` (key digest -> key row -> job row, nothing
else). Both serve at once; per connection count each gets a warm-up, then `--rounds` runs of
`wrk -t2 -cC -dDs --latency`, the two apps alternating so that both see the same background load.
The table shows the median requests/s and p50/p99 latency side by side, and every round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from service.auth.service import create_api_key
from service.core.db import unit_of_work
from service.core.migrate import upgrade
from service.core.settings import Settings
from service.core.tables import Job

ROOT = Path(__file__).resolve().parent.parent
APPS = {"rft": ["service.app:create_app", "--factory"], "thin": ["bench.thin_status_app:app"]}
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@contextlib.contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    name = f"rft_bench_{uuid.uuid4().hex[:10]}"
    admin = server_url.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed_job(settings: Settings) -> tuple[str, str]:
    """A project key and one job row of that project: what a client polls."""
    with unit_of_work(settings) as session:
        project, key = create_api_key(session, settings, "bench")
        grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "x"}
        method = {"type": "reinforcement", "reinforcement": {"grader": grader | {"operation": "eq"}}}
        job = Job(
            id="ftjob-bench" + uuid.uuid4().hex[:12],
            project_id=project.id,
            model="tiny-random-llama",
            training_file="file-bench",
            seed=1,
            method=method,
            status="running",
            result_files=[],
        )
        session.add(job)
    return key, job.id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(app: str, env: dict[str, str], workers: int, path: str, key: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", *APPS[app], "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                    break
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{app} did not answer {path} with 200")
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def wrk(url: str, key: str, connections: int, seconds: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{url} answered {non_2xx.group(1)} non-2xx responses:\n{out}")

    def percentile(p: int) -> float:
        found = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if found is None:
            raise RuntimeError(f"no {p}% latency in wrk's output:\n{out}")
        return float(found.group(1)) * UNITS[found.group(2)]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rate, "p50": percentile(50), "p99": percentile(99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--connections", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per app; the median is shown")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(bench_database(args.pg))
        data = stack.enter_context(tempfile.TemporaryDirectory(prefix="rft-bench-"))
        upgrade(url)
        key, job_id = seed_job(Settings(database_url=url, data_dir=Path(data)))
        env = {"RFT_DATABASE_URL": url, "RFT_DATA_DIR": data, "RFT_BROKER_URL": "memory://"}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        # One key polling thousands of times a second is what the per-key rate limit refuses; lifted here,
        # the limiter still runs (and costs what it costs) on every request.
        env |= {"RFT_REQUESTS_PER_SECOND": "1000000", "RFT_REQUEST_BURST": "1000000"}
        path = f"/v1/fine_tuning/jobs/{job_id}"
        bases = {app: stack.enter_context(serve(app, env, args.workers, path, key)) for app in APPS}
        print(f"{os.cpu_count()} CPUs, uvicorn --workers {args.workers}, wrk -t2 -d{args.duration}s, GET {path}")
        print(f"{'app':<6}{'conns':>6}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}   each round (req/s p50 p99)")
        for connections in args.connections:
            runs: dict[str, list[dict[str, float]]] = {app: [] for app in APPS}
            for base in bases.values():
                wrk(base + path, key, connections, 2)  # warm-up: pools filled, code paths loaded
            for _ in range(args.rounds):  # alternating, so both see the same background load
                for app, base in bases.items():
                    runs[app].append(wrk(base + path, key, connections, args.duration))
            for app, results in runs.items():
                med = {m: statistics.median(r[m] for r in results) for m in ("rps", "p50", "p99")}
                each = ", ".join(f"{r['rps']:.0f} {r['p50']:.1f} {r['p99']:.1f}" for r in results)
                print(f"{app:<6}{connections:>6}{med['rps']:>8.0f}{med['p50']:>8.2f}{med['p99']:>8.2f}   {each}")


if __name__ == "__main__":
    main()
