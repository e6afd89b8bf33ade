"""What a python-grader sandbox may see, and the bubblewrap command that builds it.

Each sandbox process starts in a fresh root that bubblewrap (the sandbox tool Flatpak uses) assembles
from an allowlist, read-only: the grader environment's interpreter, standard library and packages (a
venv of its own, apart from the service's packages: see grader-requirements.txt), the system's shared
libraries, and one file of ours (sandbox_worker.py); then /dev/null, /dev/zero, /dev/urandom, a /proc of
its own PID namespace and a private, size-capped tmpfs /tmp. Nothing else of the host exists there: no
data folder, database, settings, source tree, /root, /home, /run, other sandboxes or other processes.
It gets its own network (loopback only, down), IPC, UTS and PID namespaces, no capabilities, and the
seccomp filter of seccomp.py.

Two ways to get there, chosen by the service's own privileges:
- root (the Docker image, docker-compose): bwrap runs as root without a user namespace and keeps only
  CAP_SETUID/CAP_SETGID, which the worker spends on switching to a uid of its own before it reads any
  user code (see sandbox.py for why a uid per sandbox).
- any other user: bwrap makes an unprivileged user namespace (which the host must allow), and the sandbox
  runs as the service's uid inside its own namespaces, with further user namespaces disabled.
Where neither works, `check_available` says why and python graders are refused; they never run with less.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.graders.seccomp import filter_for_machine

WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py")
WORKER_PATH = "/rft/sandbox_worker.py"  # where the sandbox sees it
SYSTEM_LIBRARIES = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/usr/share/zoneinfo")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
FAILURE_CACHE_S = 30.0

# Runs in the grader environment's interpreter, outside any sandbox: it is the operator's venv, not user code.
_PROBE = r"""
import json, os, platform, sys, sysconfig
from importlib import metadata
base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
shared = None
if sysconfig.get_config_var("Py_ENABLE_SHARED") and sysconfig.get_config_var("INSTSONAME"):
    shared = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
packages = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name and name.lower() not in ("pip", "setuptools", "wheel"):
        packages[name] = dist.version
print(json.dumps({
    "version": platform.python_version(),
    "prefix": sys.prefix,
    "path": [p for p in sys.path if p],
    "stdlib": sorted({sysconfig.get_path("stdlib"), base["platstdlib"]}),
    "base_site": sorted({base["purelib"], base["platlib"]}),
    "shared_library": shared,
    "packages": sorted(packages.items(), key=lambda kv: kv[0].lower()),
}))
"""


class SandboxUnavailable(InvalidRequest):
    """This server cannot run python graders safely, so it refuses them (a 400 naming why)."""

    code = "python_grader_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"Python graders are unavailable on this server: {reason}. Use another grader type, "
            "or ask the operator to fix this (see GET /v1/fine_tuning/alpha/graders/environment).",
            param="grader",
        )
        self.reason = reason


@dataclass(frozen=True)
class GraderEnvironment:
    """The grader venv as its own interpreter describes it."""

    python: str  # the venv's interpreter, as invoked (its pyvenv.cfg sits beside it)
    version: str
    prefix: str
    path: tuple[str, ...]
    stdlib: tuple[str, ...]
    base_site: tuple[str, ...]
    shared_library: str | None
    packages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Isolation:
    """Everything needed to start sandboxes: the bwrap binary, the grader environment, the privilege mode."""

    bwrap: str
    bwrap_version: str
    environment: GraderEnvironment
    privileged: bool  # root: a uid of its own per sandbox; otherwise an unprivileged user namespace
    seccomp: bytes = field(repr=False)

    @property
    def mechanism(self) -> str:
        mode = "as root, a uid per sandbox" if self.privileged else "in an unprivileged user namespace"
        return f"{self.bwrap_version} ({mode}), seccomp filter, no network"

    def command(self, tmp_bytes: int, seccomp_fd: int | str) -> list[str]:
        """The argv that starts one sandbox worker; `seccomp_fd` must be readable in the child (or a
        placeholder the caller replaces with its number)."""
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if self.privileged:
            caps = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            namespaces += ["--unshare-user", "--disable-userns"]
            caps = ["--cap-drop", "ALL"]
        # bwrap would make /dev 0700 for the device binds: unusable once the worker drops to its own uid.
        devices = ["--perms", "0755", "--dir", "/dev"]
        devices += [a for device in DEVICES for a in ("--dev-bind", device, device)]
        return [
            self.bwrap,
            *namespaces,
            "--hostname",
            "grader",
            "--die-with-parent",
            *caps,
            # The private /tmp first: a grader environment that lives under the host's /tmp (a checkout
            # there) is then bound on top of it, instead of being hidden by it.
            "--size",
            str(tmp_bytes),
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",
            *_root_tree(self.environment),
            "--proc",
            "/proc",
            *devices,
            "--ro-bind",
            str(WORKER_SOURCE),
            WORKER_PATH,
            "--chdir",
            "/tmp",
            "--seccomp",
            str(seccomp_fd),
            "--",
            self.environment.python,
            "-I",
            "-B",
            WORKER_PATH,
        ]


def _symlink_chain(path: str) -> tuple[list[tuple[str, str]], str]:
    """(link, target) pairs from `path` to the file it finally names, and that file."""
    links: list[tuple[str, str]] = []
    for _ in range(40):
        if not os.path.islink(path):
            return links, path
        target = os.readlink(path)
        links.append((path, target))
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise SandboxUnavailable(f"the grader interpreter {path} is a symlink loop")


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _root_tree(env: GraderEnvironment) -> list[str]:
    """bwrap arguments that lay out the read-only part of the sandbox's root."""
    binds: list[str] = [d for d in SYSTEM_LIBRARIES if os.path.isdir(d) and not os.path.islink(d)]
    links: list[tuple[str, str]] = [(os.readlink(d), d) for d in SYSTEM_LIBRARIES if os.path.islink(d)]
    binds += [path for path in SYSTEM_FILES if os.path.exists(path)]
    trees = sorted({env.prefix, *env.stdlib, *(p for p in env.path if os.path.isdir(p))})
    trees = [t for t in trees if os.path.exists(t) and not any(_under(t, o) and t != o for o in trees)]
    binds += trees
    chain, interpreter = _symlink_chain(env.python)
    links += [(target, link) for link, target in chain if not any(_under(link, t) for t in trees)]
    binds += [p for p in (interpreter, env.shared_library) if p and not any(_under(p, t) for t in trees)]
    # bwrap would create the folders leading to each mount point 0700: unusable once the worker is not root.
    parents = {os.path.dirname(p) for p in [*binds, *(link for _, link in links), WORKER_PATH]}
    ancestors = {a for p in parents for a in _ancestors(p)}
    args = [a for d in sorted(ancestors, key=lambda d: (d.count("/"), d)) for a in ("--perms", "0755", "--dir", d)]
    args += [a for target, link in links for a in ("--symlink", target, link)]
    args += [a for path in binds for a in ("--ro-bind", path, path)]
    # Trees bound above may hold site-packages the grader must not import or read: the base interpreter's
    # (the Docker image installs the service there) and any folder on the service's own path.
    for hidden in sorted({*env.base_site, *(os.path.realpath(p) for p in sys.path if p)} - set(env.path)):
        if os.path.isdir(hidden) and any(_under(hidden, t) for t in trees):
            args += ["--tmpfs", hidden, "--remount-ro", hidden]
    return args


def _ancestors(directory: str) -> list[str]:
    parts = directory.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts)) if parts[0]]


def grader_python(settings: Settings) -> Path:
    """The grader environment's interpreter: RFT_GRADER_PYTHON, else `.venv-grader` beside the service's venv."""
    if settings.grader_python is not None:
        return settings.grader_python
    return Path(sys.prefix).parent / ".venv-grader" / "bin" / "python"


@lru_cache(maxsize=8)
def _describe(python: str, mtime: float) -> GraderEnvironment:
    try:
        done = subprocess.run(
            [python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60, env={"LANG": "C.UTF-8"}
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailable(f"the grader environment's interpreter {python} does not run ({exc})") from None
    if done.returncode != 0:
        raise SandboxUnavailable(f"the grader environment's interpreter {python} failed: {done.stderr.strip()[-300:]}")
    info: dict[str, Any] = json.loads(done.stdout)
    return GraderEnvironment(
        python=python,
        version=info["version"],
        prefix=info["prefix"],
        path=tuple(info["path"]),
        stdlib=tuple(info["stdlib"]),
        base_site=tuple(info["base_site"]),
        shared_library=info["shared_library"],
        packages=tuple((name, version) for name, version in info["packages"]),
    )


def grader_environment(settings: Settings) -> GraderEnvironment:
    python = grader_python(settings)
    if not python.exists():
        raise SandboxUnavailable(
            f"there is no grader environment at {python} (`make install` creates .venv-grader; "
            "or set RFT_GRADER_PYTHON to the python of a venv made from service/graders/grader-requirements.txt)"
        )
    python = python.absolute()
    return _describe(str(python), python.stat().st_mtime)


@lru_cache(maxsize=8)
def _bwrap_version(bwrap: str) -> str:
    try:
        done = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap ({bwrap!r}) is not installed or does not run; install it (Debian and Ubuntu: "
            "`apt-get install bubblewrap`) or point RFT_SANDBOX_BWRAP at it"
        )
    return done.stdout.strip()


def isolation_for(settings: Settings) -> Isolation:
    """How this process starts sandboxes, or SandboxUnavailable saying what is missing."""
    try:
        seccomp = filter_for_machine()
    except ValueError as exc:
        raise SandboxUnavailable(str(exc)) from None
    return Isolation(
        bwrap=settings.sandbox_bwrap,
        bwrap_version=_bwrap_version(settings.sandbox_bwrap),
        environment=grader_environment(settings),
        privileged=os.geteuid() == 0,
        seccomp=seccomp,
    )


PROBE_GRADER = "def grade(sample, item):\n    return 1.0\n"
_checked: dict[Isolation, tuple[float, str | None]] = {}
_check_lock = threading.Lock()


def check_available(settings: Settings) -> Isolation:
    """Start one real sandbox (once per process, failures re-tried after 30 s) and grade with it, or raise
    SandboxUnavailable with the reason: the refusal at job creation and at /graders/run."""
    iso = isolation_for(settings)
    with _check_lock:
        checked_at, failure = _checked.get(iso, (0.0, None))
        if checked_at and (failure is None or time.monotonic() - checked_at < FAILURE_CACHE_S):
            if failure is not None:
                raise SandboxUnavailable(failure)
            return iso
        from service.graders.sandbox import PythonGraderPool

        with PythonGraderPool(PROBE_GRADER, size=1, isolation=iso) as pool:
            outcome = pool.grade({}, {})
        failure = None if outcome.score == 1.0 else (outcome.error or "the probe grader returned no score")
        _checked[iso] = (time.monotonic(), failure)
    if failure is not None:
        raise SandboxUnavailable(failure)
    return iso
