"""Webhook delivery: latency after commit, and the retry schedule against a failing receiver.

    python bench/webhook_bench.py [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
                                  [--redis redis://127.0.0.1:6379/13] [--events 50] [--fail-first 4]
                                  [--backoff 1.0]

Two stacks, each with a real `rft worker --queues light` process: PostgreSQL + Redis (production) and
SQLite + the filesystem broker (what `rft serve` runs). A receiver on 127.0.0.1 (tests/support/receiver.py)
checks every signature with the openai SDK's verifier. Latency: `--events` events, one at a time, each
written by `emit` in its own transaction; the clock starts when that transaction has committed (an
after-commit callback registered before the event's wake-up) and stops when the receiver has the
request. Retries: one event to a receiver that answers 500 to the first `--fail-first` attempts, with
RFT_WEBHOOK_BACKOFF_SECONDS=`--backoff`; each attempt's arrival after the commit against the schedule
(the wait after failed attempt n is backoff * 2**(n-1), counted from when that attempt was logged).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import delete


@dataclass
class Result:
    p50_ms: float
    p95_ms: float
    max_ms: float
    answers: list[int]  # the failing receiver's, attempt by attempt
    offsets: list[float]  # each attempt's arrival, seconds after the commit
    gaps: list[float]  # between consecutive attempts
    wanted: list[float]  # the backoff after each failed attempt (from when it was logged, not when it arrived)
    last_verified: bool


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the receiver is the tests' own (tests/support/receiver.py)
sys.path.insert(0, str(ROOT / "bench"))

from status_poll_bench import bench_database  # noqa: E402  (a throwaway PostgreSQL database)

from service.auth.service import create_api_key  # noqa: E402
from service.core import queue  # noqa: E402
from service.core.db import on_commit, unit_of_work  # noqa: E402
from service.core.migrate import upgrade  # noqa: E402
from service.core.settings import Settings  # noqa: E402
from service.core.tables import WebhookEndpoint  # noqa: E402
from service.webhooks.service import emit  # noqa: E402
from service.webhooks.signing import new_secret  # noqa: E402
from tests.support.receiver import Receiver  # noqa: E402

EVENT = "fine_tuning.job.succeeded"


@contextlib.contextmanager
def light_worker(settings: Settings, env: dict[str, str], log: Path) -> Iterator[None]:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", "light"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        app = queue.make_celery(settings)

        def send(name: str, args: list[object], queue_name: str, countdown: float | None = None) -> None:
            app.send_task(name, args=args, queue=queue_name, countdown=countdown)

        queue.set_task_sender(send)
        try:
            yield
        finally:
            queue.set_task_sender(None)
            proc.terminate()
            proc.wait(timeout=60)


def add_endpoint(settings: Settings, project_id: str, url: str) -> str:
    with unit_of_work(settings) as session:
        row = WebhookEndpoint(
            id=f"we_bench{uuid.uuid4().hex[:10]}",
            project_id=project_id,
            name="bench",
            url=url,
            event_types=[EVENT],
            secret=new_secret(),
        )
        session.add(row)
    return row.secret


def send_event(settings: Settings, project_id: str) -> float:
    """Emit one event; the time its transaction committed."""
    stamp: list[float] = []
    with unit_of_work(settings) as session:
        on_commit(session, lambda: stamp.append(time.time()))  # runs before the event's own wake-up
        emit(session, project_id, EVENT, {"id": "ftjob-bench"})
    return stamp[0]


def measure(settings: Settings, env: dict[str, str], events: int, fail_first: int, backoff: float, log: Path) -> Result:
    upgrade(settings.sqlalchemy_url)
    with unit_of_work(settings) as session:
        project, _ = create_api_key(session, settings, "bench")
    with Receiver() as receiver, Receiver(fail_first=fail_first) as failing, light_worker(settings, env, log):
        receiver.secret = add_endpoint(settings, project.id, receiver.url)
        send_event(settings, project.id)
        receiver.wait_for(1, timeout=120)  # the worker is up
        latencies = []
        for i in range(events):
            committed = send_event(settings, project.id)
            arrived = receiver.wait_for(i + 2, timeout=60)[-1]
            assert arrived.verified
            latencies.append((arrived.at - committed) * 1000)
        with unit_of_work(settings) as session:  # only the failing receiver from here on
            session.execute(delete(WebhookEndpoint))
        failing.secret = add_endpoint(settings, project.id, failing.url)
        committed = send_event(settings, project.id)
        attempts = failing.wait_for(fail_first + 1, timeout=backoff * 2 ** (fail_first + 1) + 60)
    offsets = [a.at - committed for a in attempts]
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(
        p50_ms=statistics.median(latencies),
        p95_ms=quantiles[94],
        max_ms=max(latencies),
        answers=[a.status for a in attempts],
        offsets=offsets,
        gaps=[b - a for a, b in zip(offsets, offsets[1:], strict=False)],
        wanted=[backoff * 2**n for n in range(fail_first)],
        last_verified=attempts[-1].verified,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--fail-first", type=int, default=4)
    parser.add_argument("--backoff", type=float, default=1.0)
    args = parser.parse_args()
    shared = {"RFT_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.1/32"]', "RFT_WEBHOOK_BACKOFF_SECONDS": str(args.backoff)}
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp, bench_database(args.pg) as database:
        redis.Redis.from_url(args.redis).flushdb()
        stacks = {
            "PostgreSQL + Redis": {"RFT_DATABASE_URL": database, "RFT_BROKER_URL": args.redis},
            "SQLite + filesystem broker (rft serve)": {"RFT_DATABASE_URL": "", "RFT_BROKER_URL": ""},
        }
        for i, (name, env) in enumerate(stacks.items()):
            env = {**env, **shared, "RFT_DATA_DIR": str(Path(tmp) / f"data{i}")}
            settings = Settings(
                env="dev",
                data_dir=Path(env["RFT_DATA_DIR"]),
                database_url=env["RFT_DATABASE_URL"],
                broker_url=env["RFT_BROKER_URL"],
                webhook_allowed_networks=["127.0.0.1/32"],
            )
            results[name] = measure(
                settings, env, args.events, args.fail_first, args.backoff, Path(tmp) / f"worker{i}.log"
            )
        redis.Redis.from_url(args.redis).flushdb()
    print(f"\n{args.events} deliveries, one at a time, commit -> receiver has the request:")
    print("| stack | p50 | p95 | max |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r.p50_ms:.1f} ms | {r.p95_ms:.1f} ms | {r.max_ms:.1f} ms |")
    print(f"\nA receiver answering 500 to the first {args.fail_first} attempts, backoff {args.backoff:g} s doubling:")
    for name, r in results.items():
        print(f"{name}: answers {r.answers}, the last one's signature verified: {r.last_verified}")
        print("  attempts, s after commit: " + ", ".join(f"{o:.3f}" for o in r.offsets))
        pairs = zip(r.gaps, r.wanted, strict=True)
        print("  wait between attempts (backoff): " + ", ".join(f"{g:.3f} ({w:g})" for g, w in pairs))


if __name__ == "__main__":
    main()
