"""Python graders run confined whatever the service's privileges, or not at all.

As root (the Docker image) each sandbox gets a uid of its own; as an ordinary user it gets an unprivileged
user namespace; where neither is possible (no bubblewrap, or a host that forbids user namespaces) the
server refuses python graders with a 400 at job creation and at /graders/run instead of running them
with less. The ordinary-user cases run the service's own code as uid 65534 in a process of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth.service import create_api_key
from service.core import db
from service.core.migrate import upgrade
from service.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534
PYTHON_GRADER = {"type": "python", "name": "g", "source": "def grade(sample, item):\n    return 1.0\n"}


def _why_not_unprivileged() -> str | None:
    if os.geteuid() != 0:
        return "these tests step down from root to uid 65534; the suite is not running as root"
    if not SYSTEM_PYTHON.exists():
        return f"no {SYSTEM_PYTHON} to run the service as an ordinary user (the venv's python may sit under /root)"
    minor = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    if minor.stdout.decode().strip() != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is not Python {sys.version_info[0]}.{sys.version_info[1]}, the venv's packages' ABI"
    if not Path(sysconfig.get_paths()["purelib"]).is_relative_to(REPO):
        return "the service's venv lies outside the checkout, so it cannot be bound in for uid 65534"
    return None


@dataclass
class Stage:
    """A folder uid 65534 can use: the checkout bound at repo/, a grader venv, a data folder of its own."""

    base: Path

    @property
    def repo(self) -> Path:
        return self.base / "repo"

    @property
    def data(self) -> Path:
        return self.base / "data"

    def run(self, mode: str, *, no_userns: bool = False) -> dict[str, Any]:
        site = [self.repo / Path(sysconfig.get_paths()[k]).relative_to(REPO) for k in ("purelib", "platlib")]
        command = [sys.executable, str(REPO / "tests" / "support" / "unprivileged.py")]
        command += ["--no-userns"] if no_userns else []
        command += ["--bind", str(REPO), str(self.repo), "--", str(SYSTEM_PYTHON), "-m"]
        command += ["tests.support.unprivileged_probe", mode, str(self.data)]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.data),
            "PYTHONPATH": ":".join(map(str, [self.repo, *dict.fromkeys(site)])),
            "RFT_GRADER_PYTHON": str(self.base / "grader" / "bin" / "python"),
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    reason = _why_not_unprivileged()
    if reason:
        pytest.skip(reason)
    stage = Stage(Path(tempfile.mkdtemp(prefix="rft-unprivileged-", dir="/var/tmp")))
    try:
        stage.base.chmod(0o755)
        stage.repo.mkdir()
        # A grader environment uid 65534 can read: the system python's venv (no packages: the probe needs none).
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", stage.base / "grader"], check=True)
        stage.data.mkdir()
        os.chown(stage.data, NOBODY, NOBODY)
        yield stage
    finally:
        shutil.rmtree(stage.base, ignore_errors=True)


def test_grader_is_confined_when_the_service_is_not_root(stage: Stage) -> None:
    result = stage.run("sandbox")
    assert result["service_uid"] == NOBODY
    assert "unprivileged user namespace" in result["mechanism"]
    inside = result["inside"]
    assert inside["data_dir_visible"] is False
    assert not {"root", "home", "work", "srv", "opt"} & set(inside["root"]), inside["root"]
    assert inside["pids"] == [1, 2]  # bubblewrap's init and the worker: a PID namespace of its own
    assert inside["interfaces"] == ["lo"]
    assert (inside["seccomp"], inside["no_new_privs"], inside["cap_eff"]) == ("2", "1", "0000000000000000")


def test_grader_fork_bomb_is_capped_when_the_service_is_not_root(stage: Stage) -> None:
    """RLIMIT_NPROC counts per uid per user namespace: the sandbox's cap holds without a uid of its own."""
    assert stage.run("sandbox")["forks"] < 8


def test_python_graders_are_refused_where_user_namespaces_are_forbidden(stage: Stage) -> None:
    result = stage.run("refusal", no_userns=True)
    assert "namespace" in result["reason"], result  # bubblewrap's own words reach the operator
    status, run = result["run"]
    assert status == 400 and run["error"]["code"] == "python_grader_unavailable", run
    assert run["error"]["param"] == "grader" and result["reason"] in run["error"]["message"]
    status, job = result["job"]
    assert status == 400 and job["error"]["code"] == "python_grader_unavailable", job
    assert job["error"]["param"] == "method.reinforcement.grader"
    status, environment = result["environment"]
    assert status == 200 and environment["sandbox"]["available"] is False
    assert environment["sandbox"]["reason"] == result["reason"]


@pytest.fixture
def without_bubblewrap(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(env="dev", data_dir=tmp_path / "data", broker_url="memory://", sandbox_bwrap="/no/bwrap")
    settings.data_dir.mkdir()
    upgrade(settings.sqlalchemy_url)
    with db.unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, "tenant")
    with TestClient(create_app(settings)) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def test_python_graders_are_refused_without_bubblewrap(without_bubblewrap: tuple[TestClient, dict[str, str]]) -> None:
    client, auth = without_bubblewrap
    body = {"grader": PYTHON_GRADER, "model_sample": "x"}
    run = client.post("/v1/fine_tuning/alpha/graders/run", headers=auth, json=body)
    assert run.status_code == 400 and run.json()["error"]["code"] == "python_grader_unavailable"
    assert "bubblewrap ('/no/bwrap') is not installed" in run.json()["error"]["message"]
    multi = {"type": "multi", "name": "m", "graders": {"p": PYTHON_GRADER}, "calculate_output": "p"}
    job = {
        "model": "tiny-random-llama",
        "training_file": "file-none",
        "method": {"type": "reinforcement", "reinforcement": {"grader": multi}},
    }
    created = client.post("/v1/fine_tuning/jobs", headers=auth, json=job)
    assert created.status_code == 400, created.text
    assert created.json()["error"]["code"] == "python_grader_unavailable"  # a python grader inside a multi, too
    environment = client.get("/v1/fine_tuning/alpha/graders/environment", headers=auth).json()
    assert environment["sandbox"]["available"] is False and "bubblewrap" in environment["sandbox"]["reason"]
    other = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x"}
    other_run = client.post(
        "/v1/fine_tuning/alpha/graders/run", headers=auth, json=body | {"grader": other | {"operation": "eq"}}
    )
    assert other_run.status_code == 200, other_run.text  # only python graders are refused
