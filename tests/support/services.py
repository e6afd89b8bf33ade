"""Find the PostgreSQL and Redis the suite needs, start throwaway ones where binaries exist,
or say why the tests that need them are skipped."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg
import redis

PG_URL = os.environ.get("RFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RFT_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_ok(url: str) -> bool:
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    pwd.getpwnam("postgres")  # KeyError: no user to run the server as
    return ["runuser", "-u", "postgres", "--", *argv]


def _start_postgres() -> str:
    candidates = [shutil.which("initdb")] + sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    initdb = next((c for c in candidates if c), None)
    if initdb is None:
        raise RuntimeError("PostgreSQL is not running at RFT_TEST_PG_URL and no initdb binary was found")
    bindir = os.path.dirname(initdb)
    data = tempfile.mkdtemp(prefix="rft-pg-")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([initdb, "-D", data, "-A", "trust", "-U", "postgres"]), check=True, capture_output=True)
    pg_ctl = os.path.join(bindir, "pg_ctl")
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", data, "-o", opts, "-w", "start", "-l", f"{data}/log"]),
        check=True,
        capture_output=True,
    )
    atexit.register(
        lambda: subprocess.run(_as_postgres([pg_ctl, "-D", data, "-m", "immediate", "stop"]), capture_output=True)
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    if not _pg_ok(url):
        raise RuntimeError(f"started PostgreSQL in {data} but cannot connect to it")
    return url


def postgres_url() -> str:
    """A reachable PostgreSQL server URL (the configured one, or one started here)."""
    if _pg_ok(PG_URL):
        return PG_URL
    return _start_postgres()


def create_database(server_url: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _redis_ok(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def redis_url() -> str:
    """A reachable Redis server URL (the configured one, or one started here)."""
    if _redis_ok(REDIS_URL):
        return REDIS_URL
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("Redis is not running at RFT_TEST_REDIS_URL and no redis-server binary was found")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    atexit.register(proc.terminate)
    url = f"redis://127.0.0.1:{port}"
    for _ in range(50):
        if _redis_ok(url):
            return url
        time.sleep(0.1)
    raise RuntimeError("started redis-server but it does not answer")


S3_KEY = {"s3_access_key_id": "rft-test", "s3_secret_access_key": "rft-test-secret", "s3_region": "us-east-1"}


def s3_endpoint() -> str:
    """An S3-compatible server over HTTP: moto's (`moto[server]`, a dev dependency), started here."""
    import sys

    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(server):
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]', part of the dev extra)")
    port = _free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], **quiet)  # type: ignore[call-overload]
    atexit.register(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("started moto_server but it does not answer")
