"""A hostile tenant's python grader, sent through the API the way an attacker would send it, sees nothing
it should not: not the data folder (uploads of other projects, the database, the key file), not the
source tree or the service's packages, not the host's folders or processes, not other sandboxes; and the
kernel refuses the system calls that would widen its reach.

The service here is `rft serve`'s default (SQLite and local storage in one data folder) with the data
folder where production keeps it: outside /tmp, made by a plain mkdir (0755), as a Docker volume is.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
import uuid
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
from service.graders.isolation import SYSTEM_FILES, SYSTEM_LIBRARIES, WORKER_PATH, grader_environment
from service.graders.sandbox import GradeOutcome, PythonGraderPool, SandboxLimits
from service.graders.seccomp import SYSCALLS, denied_syscalls

REPO = Path(__file__).resolve().parents[1]
SECRET = "tenant-a-secret-7f3a9c"


def python_grader(body: str) -> dict[str, Any]:
    source = "import os, sys\n\ndef grade(sample, item):\n" + textwrap.indent(textwrap.dedent(body), "    ")
    return {"type": "python", "name": "probe", "source": source}


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path("/var/tmp") / f"rft-attack-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)  # whatever the umask: the mode a plain mkdir or a fresh Docker volume has
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Server:
    client: TestClient
    settings: Settings
    keys: dict[str, dict[str, str]]  # tenant -> auth header
    projects: dict[str, str]  # tenant -> project id

    def grade(self, tenant: str, body: str, item: dict[str, Any]) -> dict[str, Any]:
        """POST /graders/run as `tenant` with a python grader whose grade() runs `body`."""
        response = self.client.post(
            "/v1/fine_tuning/alpha/graders/run",
            headers=self.keys[tenant],
            json={"grader": python_grader(body), "model_sample": "x", "item": item},
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture
def serve(data_dir: Path) -> Iterator[Server]:
    """The embedded server on SQLite in `data_dir`, with keys for tenants a and b."""
    settings = Settings(env="dev", data_dir=data_dir, broker_url="memory://")
    data_dir.mkdir(mode=0o755)
    upgrade(settings.sqlalchemy_url)
    keys, projects = {}, {}
    with db.unit_of_work(settings) as session:
        for tenant in ("a", "b"):
            project, key = create_api_key(session, settings, f"tenant-{tenant}")
            keys[tenant], projects[tenant] = {"Authorization": f"Bearer {key}"}, project.id
    (data_dir / "api_key").write_text("rft-the-dev-key\n")
    with TestClient(create_app(settings)) as client:
        yield Server(client, settings, keys, projects)


def runtime_error(result: dict[str, Any]) -> str:
    errors = result["metadata"]["errors"]
    assert errors["python_grader_runtime_error"], result
    details: str = errors["python_grader_runtime_error_details"]
    return details


READ = """\
with open(item["path"], "rb") as f:
    data = f.read()
raise RuntimeError(data[:200])
"""
LIST = 'import json\nraise RuntimeError(json.dumps(sorted(os.listdir(item["path"]))))\n'


def listing(result: dict[str, Any]) -> list[str]:
    """What LIST found, parsed back out of the error text."""
    names: list[str] = json.loads(runtime_error(result).split("RuntimeError: ", 1)[1].rsplit(" (line", 1)[0])
    return names


def test_grader_of_b_cannot_read_a_upload(serve: Server) -> None:
    content = f'{{"messages": [{{"role": "user", "content": "{SECRET}"}}]}}\n'.encode()
    upload = serve.client.post(
        "/v1/files", headers=serve.keys["a"], files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert upload.status_code == 200, upload.text
    stored = serve.settings.storage_dir / "files" / serve.projects["a"] / upload.json()["id"]
    assert SECRET in stored.read_text()  # the bytes are there, at the path the attacker names exactly
    result = serve.grade("b", READ, {"path": str(stored)})
    assert result["reward"] == 0
    assert "FileNotFoundError" in runtime_error(result) and SECRET not in str(result)


def test_grader_cannot_see_the_data_folder(serve: Server, data_dir: Path) -> None:
    assert {"rft.db", "storage", "api_key"} <= set(os.listdir(data_dir))
    for path in (data_dir, data_dir.parent, data_dir / "storage"):
        assert "FileNotFoundError" in runtime_error(serve.grade("b", LIST, {"path": str(path)})), path


@pytest.mark.parametrize("name", ["rft.db", "api_key"])
def test_grader_cannot_open_the_database_or_the_key_file(serve: Server, data_dir: Path, name: str) -> None:
    result = serve.grade("b", READ, {"path": str(data_dir / name)})
    assert "FileNotFoundError" in runtime_error(result) and "rft-the-dev-key" not in str(result)


def test_grader_cannot_read_the_source_tree_or_import_the_service(serve: Server) -> None:
    for path in (REPO / "service" / "core" / "settings.py", REPO / "pyproject.toml", REPO / "service"):
        result = serve.grade("b", READ if path.is_file() else LIST, {"path": str(path)})
        assert "FileNotFoundError" in runtime_error(result), path
    for module in ("service", "workers", "fastapi", "sqlalchemy", "torch", "celery"):
        result = serve.grade("b", "__import__(item['m'])\nreturn 1.0\n", {"m": module})
        assert f"ModuleNotFoundError: No module named '{module}'" in runtime_error(result)


def test_grader_imports_the_documented_package_set(serve: Server) -> None:
    # Imported at module level, as graders do: that runs under the start-up timeout, not grade()'s 10 s.
    source = "import numpy, scipy, sympy, pandas, jsonschema, rapidfuzz, sklearn, yaml, deepdiff, nltk\n\n"
    grader = {"type": "python", "name": "imports", "source": source + "def grade(sample, item):\n    return 1.0\n"}
    body = {"grader": grader, "model_sample": "x", "item": {}}
    response = serve.client.post("/v1/fine_tuning/alpha/graders/run", headers=serve.keys["b"], json=body)
    assert response.status_code == 200 and response.json()["reward"] == 1.0, response.text
    listed = serve.client.get("/v1/fine_tuning/alpha/graders/environment", headers=serve.keys["b"]).json()
    names = {p["name"].lower() for p in listed["packages"]}
    assert {"numpy", "scipy", "sympy", "pandas", "jsonschema", "rapidfuzz"} <= names, names
    assert listed["sandbox"]["available"] is True and "bubblewrap" in listed["sandbox"]["mechanism"]


def allowed_trees(settings: Settings) -> list[str]:
    """What the sandbox's root may hold: the allowlist isolation.py documents, written out again here."""
    env = grader_environment(settings)
    trees = [*SYSTEM_LIBRARIES, *SYSTEM_FILES, WORKER_PATH, env.prefix, *env.stdlib]
    trees.append(os.path.dirname(os.path.realpath(env.python)))  # the interpreter and the links leading to it
    return trees + ([env.shared_library] if env.shared_library else [])


def tmp_entries(settings: Settings) -> set[str]:
    """What the sandbox's /tmp holds before a grader writes: the first step towards an allowed tree that
    lies under the host's /tmp (a checkout there), else nothing."""
    return {Path(t).relative_to("/tmp").parts[0] for t in allowed_trees(settings) if t.startswith("/tmp/")}


WALK = """\
def inside(path):
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in item["trees"])
strays = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/dev", "/tmp") or inside(top):
        dirs[:] = []
        continue
    for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
        if not inside(os.path.join(top, name)):
            strays.append(os.path.join(top, name))
if strays:
    raise RuntimeError(f"{len(strays)} files outside the allowlist: {strays[:20]}")
return float(len(os.listdir("/dev")) + len(os.listdir("/tmp")))
"""


def test_sandbox_root_holds_only_the_allowlist(serve: Server) -> None:
    """Walk the sandbox's whole filesystem: every file in it lies in a tree the allowlist names."""
    result = serve.grade("b", WALK, {"trees": allowed_trees(serve.settings)})
    # /dev holds null, zero, urandom; /tmp is empty but for the way to an allowed tree under the host's /tmp
    assert result["reward"] == 3.0 + len(tmp_entries(serve.settings)), result


def test_the_allowlist_walk_would_name_a_stray(serve: Server) -> None:
    """The walk is not vacuous: leave the worker file out of its allowlist and it is found."""
    trees = [t for t in allowed_trees(serve.settings) if t != WORKER_PATH]
    assert f"1 files outside the allowlist: ['{WORKER_PATH}']" in runtime_error(
        serve.grade("b", WALK, {"trees": trees})
    )


def test_grader_sees_no_host_folder_beyond_the_paths_to_its_environment(serve: Server) -> None:
    trees = [Path(t) for t in allowed_trees(serve.settings)]
    for folder in map(Path, ("/root", "/home", "/etc", "/var", "/run", "/srv", "/opt", "/mnt", "/usr", "/work")):
        on_the_way = {t.relative_to(folder).parts[0] for t in trees if folder in t.parents}
        result = serve.grade("b", LIST, {"path": str(folder)})
        if on_the_way:  # a step towards an allowed tree shows that step and nothing else
            assert set(listing(result)) <= on_the_way, folder
        else:
            assert "FileNotFoundError" in runtime_error(result), folder


def test_grader_cannot_see_the_base_interpreters_packages(serve: Server) -> None:
    """The grader venv's stdlib sits beside its base interpreter's site-packages (where the Docker image
    installs the service): that folder is bound in with the stdlib, and must be empty."""
    env = grader_environment(serve.settings)
    hidden = [site for site in env.base_site if os.path.isdir(site) and os.listdir(site)]
    if not hidden:
        pytest.skip(f"the base interpreter's site-packages ({env.base_site}) hold nothing here to hide")
    for site in hidden:
        assert listing(serve.grade("b", LIST, {"path": site})) == [], site


def test_sandboxes_do_not_share_a_tmp(serve: Server) -> None:
    write = 'open("/tmp/planted", "w").write(item["s"])\nreturn float(os.path.exists("/tmp/planted"))\n'
    assert serve.grade("a", write, {"s": SECRET})["reward"] == 1.0
    assert "FileNotFoundError" in runtime_error(serve.grade("b", READ, {"path": "/tmp/planted"}))


def test_sandbox_filesystem_is_read_only(serve: Server) -> None:
    env = grader_environment(serve.settings)
    site = next(p for p in env.path if p.startswith(env.prefix) and p.endswith("site-packages"))
    body = 'open(item["path"], "w").write("x")\nreturn 1.0\n'
    for path in (f"{site}/sitecustomize.py", "/usr/lib/planted", f"{env.stdlib[0]}/os.py"):
        assert "Read-only file system" in runtime_error(serve.grade("b", body, {"path": path})), path
    assert not Path(site, "sitecustomize.py").exists()


@pytest.fixture
def pool() -> Iterator[PythonGraderPool]:
    source = """\
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)

def grade(sample, item):
    if item.get("syscall") is not None:
        args = [ctypes.c_long(a) for a in item.get("args", [0, 0, 0, 0, 0])]
        result = libc.syscall(ctypes.c_long(item["syscall"]), *args)
        if result == 0 and item.get("fork"):
            os._exit(0)  # a clone that went through: the child must not speak for the sandbox
        return float(-ctypes.get_errno() if result == -1 else result)
    if item.get("write"):
        with open("/tmp/fill", "wb") as f:
            for _ in range(item["write"]):
                f.write(b"\\0" * 2**20)
        return 1.0
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    value = status[item["field"]].strip()
    return float(int(value, 16)) if item.get("hex") else float(value)
"""
    limits = SandboxLimits(timeout_s=10.0, tmp_bytes=8 * 1024**2)
    with PythonGraderPool(source, size=1, limits=limits) as pool:
        yield pool


MACHINE = os.uname().machine
NUMBERS = SYSCALLS.get(MACHINE, {})
needs_filter = pytest.mark.skipif(not NUMBERS, reason=f"no seccomp filter for {MACHINE}: python graders refused")


@needs_filter
@pytest.mark.parametrize(
    "name",
    [
        "mount",
        "umount2",
        "pivot_root",
        "ptrace",
        "kexec_load",
        "init_module",
        "finit_module",
        "delete_module",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "unshare",
        "setns",
        "io_uring_setup",
        "userfaultfd",
        "process_vm_readv",
    ],
)
def test_seccomp_refuses(pool: PythonGraderPool, name: str) -> None:
    assert name in denied_syscalls(MACHINE)
    args = [0x10000000 if name == "unshare" else 0, 0, 0, 0, 0]  # unshare(CLONE_NEWUSER), which bwrap alone may do
    assert pool.grade({}, {"syscall": NUMBERS[name], "args": args}) == GradeOutcome(-float(errno.EPERM))


@needs_filter
def test_seccomp_refuses_clone_into_a_new_namespace_but_not_a_plain_fork(pool: PythonGraderPool) -> None:
    clone_newuser = {"syscall": NUMBERS["clone"], "args": [0x10000000 | 17, 0, 0, 0, 0], "fork": True}  # | SIGCHLD
    assert pool.grade({}, clone_newuser) == GradeOutcome(-float(errno.EPERM))
    clone3 = {"syscall": NUMBERS["clone3"], "args": [0, 0, 0, 0, 0]}
    assert pool.grade({}, clone3) == GradeOutcome(-float(errno.ENOSYS))
    plain = pool.grade({}, {"syscall": NUMBERS["clone"], "args": [17, 0, 0, 0, 0], "fork": True})
    assert plain.score is not None and plain.score > 0  # a child pid: forks still work


def test_sandbox_runs_under_seccomp_without_privileges(pool: PythonGraderPool) -> None:
    assert pool.grade({}, {"field": "Seccomp"}) == GradeOutcome(2.0)  # filter mode
    assert pool.grade({}, {"field": "NoNewPrivs"}) == GradeOutcome(1.0)
    for field in ("CapEff", "CapPrm", "CapBnd" if os.geteuid() != 0 else "CapAmb"):
        assert pool.grade({}, {"field": field, "hex": True}) == GradeOutcome(0.0), field


def test_tmp_is_size_capped(pool: PythonGraderPool) -> None:
    outcome = pool.grade({}, {"write": 32})  # 32 MiB into an 8 MiB /tmp
    assert outcome.error_type == "python_grader_runtime_error" and "No space left on device" in (outcome.error or "")
    assert pool.grade({}, {"field": "NoNewPrivs"}) == GradeOutcome(1.0)


def test_syscall_numbers_match_this_kernels_headers() -> None:
    """The filter's table for this machine agrees with the kernel's uapi header, where one is installed."""
    header = Path("/usr/include") / f"{MACHINE}-linux-gnu" / "asm" / "unistd_64.h"
    if not header.exists():
        pytest.skip(f"no {header} to check against")
    defined = {
        line.split()[1].removeprefix("__NR_"): int(line.split()[2])
        for line in header.read_text().splitlines()
        if line.startswith("#define __NR_") and len(line.split()) == 3 and line.split()[2].isdigit()
    }
    assert {name: defined[name] for name in NUMBERS} == NUMBERS
