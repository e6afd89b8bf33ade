"""`rft`: serve the API (with embedded workers by default), run workers, migrate, manage keys; and the
client commands of `service.cli_client` (files, jobs, checkpoints, chat) against any server."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

from service import cli_client
from service.core.private import private_dir, restrict_umask, write_private
from service.core.settings import Settings, get_settings

DEFAULT_PROJECT = "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rft", description="Self-hosted reinforcement fine-tuning service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run migrations, the API and (unless --no-workers) the workers")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-workers", action="store_true", help="serve the API only (workers run elsewhere)")
    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="training", help="training, light, or training,light")
    worker.add_argument("--beat", action="store_true", help="also run the periodic lease reaper and file expirer")
    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key for a project (created if new)")
    create.add_argument("--project", required=True)
    models = sub.add_parser("models", help="base models, where you are").add_subparsers(
        dest="models_command", required=True
    )
    download = models.add_parser(
        "download",
        help="write a built-in base model (e.g. smollm2-135m-instruct) as the Hugging Face folder training "
        "loads, for loading a downloaded LoRA adapter onto; no server needed",
    )
    download.add_argument("name", help="smollm2-135m-instruct or tiny-random-llama")
    download.add_argument("-o", "--output", help="the folder to write (default: ./NAME, where adapters look)")
    cli_client.register(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "client_handler"):  # a client command: talks HTTP, needs no server settings
        return cli_client.run(args)
    if args.command == "models":  # local: the user's files, under the user's umask
        return _download_base(args.name, args.output)

    restrict_umask()  # server processes (and the workers they spawn) write for their own user only
    settings = get_settings()
    if args.command == "migrate":
        _migrate(settings)
    elif args.command == "keys":
        _migrate(settings)
        print(_create_key(settings, args.project))
    elif args.command == "worker":
        return _run_worker(settings, args.queues, args.beat)
    elif args.command == "serve":
        return _serve(settings, args.host or settings.host, args.port or settings.port, not args.no_workers)
    return 0


def _download_base(name: str, output: str | None) -> int:
    from pathlib import Path

    from service.models.export import ExportError, export_base

    try:
        folder = export_base(name, Path(output or name))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _migrate(settings: Settings) -> None:
    from service.core.migrate import upgrade

    private_dir(settings.data_dir)
    upgrade(settings.sqlalchemy_url)


def _create_key(settings: Settings, project: str) -> str:
    from service.auth.service import create_api_key
    from service.core.db import unit_of_work

    with unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, project)
    return key


def _dev_key(settings: Settings) -> str:
    """The embedded server's key: kept (0600) in the data dir so restarts print the same one."""
    from service.auth.repository import active_key_by_hash
    from service.auth.service import hash_key
    from service.core.db import unit_of_work

    path = settings.data_dir / "api_key"
    if path.exists():
        key = path.read_text().strip()
        with unit_of_work(settings) as session:
            if active_key_by_hash(session, hash_key(key, settings.secret_key)) is not None:
                return key
    key = _create_key(settings, DEFAULT_PROJECT)
    write_private(path, (key + "\n").encode())
    return key


def worker_argv(settings: Settings, queues: str, beat: bool) -> list[str]:
    name = "-".join(q for q in queues.split(",") if "." not in q)  # not the worker's own queue
    argv = ["worker", "-Q", queues, "-n", f"{name}@%h", "-l", "INFO", "--without-gossip", "--without-mingle"]
    if "training" in queues.split(","):
        # One job per process, and a fresh process per job: memory (and CUDA state) never leaks across jobs.
        argv += ["--concurrency", "1", "--max-tasks-per-child", "1"]
    else:
        # Light tasks wait on I/O; threads have no pool children to orphan or deadlock at shutdown.
        argv += ["--pool", "threads", "--concurrency", "2"]
    if beat:
        argv += ["--beat", "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    return argv


def _run_worker(settings: Settings, queues: str, beat: bool) -> int:
    from service.core.observability import configure_logging
    from service.fleet.service import own_queue
    from workers.celery_app import app
    from workers.fleet import FleetReporter, main_worker_id

    configure_logging(settings)
    private_dir(settings.data_dir)
    worker_id = main_worker_id()
    listening = queues.split(",")
    if "training" in listening:  # the router sends a job here when this worker is the one that fits
        listening.append(own_queue(worker_id))
    reporter = FleetReporter(settings, worker_id, listening)
    reporter.start()
    try:
        app.worker_main(worker_argv(settings, ",".join(listening), beat))
    finally:
        reporter.stop()
    return 0


def _die_with_parent() -> None:
    # Linux: the embedded workers get SIGTERM if `rft serve` dies, even by SIGKILL.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "RFT_DATA_DIR": str(settings.data_dir)}
    specs = [("training", False), ("light", True)]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", q] + (["--beat"] if b else []),
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        for q, b in specs
    ]


def _serve(settings: Settings, host: str, port: int, with_workers: bool) -> int:
    import uvicorn
    from sqlalchemy import make_url

    from service.app import create_app
    from service.core.observability import configure_logging

    configure_logging(settings)
    _migrate(settings)
    # A ready key is a dev convenience; a production server's keys come from `rft keys create`.
    key = _dev_key(settings) if settings.env == "dev" else "(create one with `rft keys create --project NAME`)"
    workers = _spawn_workers(settings) if with_workers else []
    base = f"http://{host}:{port}/v1"
    database = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)
    print(
        f"rft is serving at {base}\n"
        f"  data dir: {settings.data_dir}\n  database: {database}\n"
        f"  broker:   {settings.celery_broker_url}\n  API key:  {key}\n"
        f"Use it with the openai SDK:\n  export OPENAI_BASE_URL={base} OPENAI_API_KEY={key}",
        flush=True,
    )
    try:
        # JSON logs: uvicorn's own lines go through the root handler too, so every line is JSON
        log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", log_config=log_config)
    finally:
        _stop_workers(workers, settings.shutdown_grace_seconds)
    return 0


def _stop_workers(workers: list[subprocess.Popen[bytes]], grace_seconds: float) -> None:
    """SIGTERM each worker: a training worker checkpoints its job after the current step, puts it
    back in the queue and exits (workers/shutdown.py). One still running after `grace_seconds` is
    killed with its pool; its job's lease lapses and the reaper requeues it from its last checkpoint."""
    for proc in workers:
        proc.terminate()
    deadline = time.monotonic() + grace_seconds
    for proc in workers:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
