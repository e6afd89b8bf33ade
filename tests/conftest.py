"""Fixtures: a real PostgreSQL database migrated by Alembic once per session, a rolled-back
transaction per test (Polar's pattern), real Redis, and an API client bound to that transaction."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.auth.service import create_api_key
from service.core import db, queue
from service.core.migrate import upgrade
from service.core.settings import Settings
from service.core.tables import Base, Job
from tests.support import services
from tests.support.procs import Proc

# Code that reads the global settings (the Celery app at import) must not touch ~/.rft.
os.environ.setdefault("RFT_DATA_DIR", tempfile.mkdtemp(prefix="rft-test-"))


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        return services.postgres_url()
    except (RuntimeError, KeyError, OSError) as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        return services.redis_url()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"Redis unavailable: {exc}")


@pytest.fixture(scope="session")
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh database with `alembic upgrade head` applied, dropped at the end."""
    url = services.create_database(pg_server, "rft_test")
    upgrade(url)
    yield url
    services.drop_database(pg_server, url)


@pytest.fixture(scope="session")
def pg_engine(pg_database: str) -> Iterator[Engine]:
    engine = db.make_engine(pg_database)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(pg_engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test: nothing persists."""
    connection = pg_engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()
    outer.rollback()
    connection.close()


@pytest.fixture
def settings(tmp_path: Path, pg_database: str) -> Settings:
    return Settings(env="dev", data_dir=tmp_path / "data", database_url=pg_database, broker_url="memory://")


@pytest.fixture
def sent_tasks() -> Iterator[list[tuple[str, list[Any], str]]]:
    """Wake-up messages the code under test sent (after its commits), instead of a broker."""
    sent: list[tuple[str, list[Any], str]] = []

    def record(name: str, args: list[Any], queue_name: str, countdown: float | None = None) -> None:
        sent.append((name, args, queue_name))

    queue.set_task_sender(record)
    yield sent
    queue.set_task_sender(None)


@pytest.fixture
def client(settings: Settings, db_session: Session, sent_tasks: list[Any]) -> Iterator[TestClient]:
    app = create_app(settings)
    app.state.sessionmaker = lambda: db_session
    with TestClient(app) as test_client:
        yield test_client


def make_key(db_session: Session, settings: Settings, project: str) -> dict[str, str]:
    _, key = create_api_key(db_session, settings, project)
    db_session.commit()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def auth(db_session: Session, settings: Settings) -> dict[str, str]:
    return make_key(db_session, settings, "acme")


@pytest.fixture
def other_auth(db_session: Session, settings: Settings) -> dict[str, str]:
    return make_key(db_session, settings, "globex")


GOOD_LINES = [
    {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(1, 6)
]
GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def upload(client: TestClient, auth: dict[str, str], content: bytes, filename: str = "train.jsonl") -> Any:
    response = client.post(
        "/v1/files", headers=auth, files={"file": (filename, content)}, data={"purpose": "fine-tune"}
    )
    return response


def submit(client: TestClient, auth: dict[str, str], settings: Settings, body: dict[str, Any]) -> str:
    """Create the job `body` describes (asserting the API took it) and validate it as the light
    worker would; its id. The job is then queued for a worker, or for `runner.run_job`."""
    from workers import validate

    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 200, response.text
    job_id = str(response.json()["id"])
    validate.validate_job(job_id, settings)
    return job_id


def train_local_model(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    folder: Path | str,
    lines: list[Any],
    grader: dict[str, Any],
    hyperparameters: dict[str, Any],
    response_format: dict[str, Any] | None = None,
    succeed: bool = True,
) -> str:
    """Upload `lines`, train the model saved in `folder` (or any model name) on them to the end (in this
    process, as a worker would), assert the job succeeded (unless not `succeed`); its id."""
    from workers import runner

    file_id = upload(client, auth, jsonl(lines)).json()["id"]
    reinforcement = {"grader": grader, "hyperparameters": hyperparameters, "response_format": response_format}
    body = {"model": str(folder), "training_file": file_id, "seed": 3}
    body["method"] = {"type": "reinforcement", "reinforcement": reinforcement}
    job_id = submit(client, auth, settings, body)
    runner.run_job(job_id, settings)
    with db.unit_of_work(settings) as session:
        row = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert row.status == "succeeded" or not succeed, row.error
    return job_id


def job_body(training_file: str, validation_file: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny-random-llama",
        "training_file": training_file,
        "method": {"type": "reinforcement", "reinforcement": {"grader": GRADER}},
        **extra,
    }
    if validation_file:
        body["validation_file"] = validation_file
    return body


@pytest.fixture
def files(client: TestClient, auth: dict[str, str]) -> tuple[str, str]:
    train = upload(client, auth, jsonl(GOOD_LINES[:4])).json()["id"]
    valid = upload(client, auth, jsonl(GOOD_LINES[4:]), "valid.jsonl").json()["id"]
    return train, valid


@pytest.fixture(scope="session")
def committed_database(pg_server: str) -> Iterator[str]:
    """A database whose writes really commit: for workers, which run their own transactions."""
    url = services.create_database(pg_server, "rft_it")
    upgrade(url)
    yield url
    services.drop_database(pg_server, url)


@pytest.fixture
def live_settings(tmp_path: Path, committed_database: str) -> Iterator[Settings]:
    yield Settings(
        env="dev",
        data_dir=tmp_path / "data",
        database_url=committed_database,
        broker_url="memory://",
        lease_seconds=3,
        heartbeat_seconds=0.5,
    )
    engine = db.session_factory(Settings(database_url=committed_database)).kw["bind"]
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def sqlite_live(tmp_path: Path, sent_tasks: list[Any]) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    """(client, auth headers, settings) of the service as `rft serve` runs with nothing else installed:
    SQLite under its data folder, no broker. For a machine with no PostgreSQL (a lent GPU machine)."""
    from service.core.private import private_dir

    settings = Settings(
        env="dev", data_dir=tmp_path / "data", broker_url="memory://", lease_seconds=3, heartbeat_seconds=0.5
    )
    private_dir(settings.data_dir)
    upgrade(settings.sqlalchemy_url)
    with TestClient(create_app(settings)) as client:
        with db.unit_of_work(settings) as session:
            _, key = create_api_key(session, settings, "sqlite")
        yield client, {"Authorization": f"Bearer {key}"}, settings


@pytest.fixture
def live_client(live_settings: Settings, sent_tasks: list[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(live_settings)) as test_client:
        yield test_client


@pytest.fixture
def live_auth(live_settings: Settings) -> dict[str, str]:
    with db.unit_of_work(live_settings) as session:
        _, key = create_api_key(session, live_settings, "live")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Real `rft` processes a test starts (append them); each is stopped at the end, whatever happens."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def s3_server() -> str:
    try:
        return services.s3_endpoint()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def s3_bucket(endpoint: str) -> str:
    """A new, empty bucket on the test S3 server."""
    import uuid

    import boto3

    name = f"rft-{uuid.uuid4().hex[:12]}"
    keys = services.S3_KEY
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=keys["s3_access_key_id"],
        aws_secret_access_key=keys["s3_secret_access_key"],
        region_name=keys["s3_region"],
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_settings(live_settings: Settings, s3_server: str) -> Settings:
    """`live_settings` with every byte in a fresh bucket of the S3 server (under a prefix, as operators do)."""
    bucket = s3_bucket(s3_server)
    return live_settings.model_copy(
        update={"storage_url": f"s3://{bucket}/rft", "s3_endpoint_url": s3_server, **services.S3_KEY}
    )


def set_job_flags(settings: Settings, job_id: str, **values: Any) -> None:
    """Set columns of a job row in a committed transaction (e.g. pause_requested=True)."""
    from service.core.tables import Job

    with db.unit_of_work(settings) as session:
        row = session.get_one(Job, session.query(Job.seq).filter(Job.id == job_id).scalar())
        for name, value in values.items():
            setattr(row, name, value)
