"""The sandbox process that runs one user-supplied `python` grader (sandbox.py starts and drives it).

It starts inside the root bubblewrap built for it (isolation.py): its own mount, PID, network, IPC and UTS
namespaces, under the seccomp filter. It is PID 2 there, under bwrap's init (PID 1), which stays root (or
the service's uid) so that the kernel's parent-death signal can reach it when the service dies: the
namespace, this process and whatever the grader started go with it. Lifecycle: read a `config` frame; set resource
limits and, when the service is root, switch to the sandbox's own unprivileged uid, BEFORE anything of the
user is read; check that every protection holds and answer `ready` naming any that does not (the parent
then refuses to use this sandbox); read the `load` frame, point fds 0-2 at /dev/null, compile and exec the
source once; then answer `grade` frames until the parent closes the pipe. After every grade() it kills
every other process in its PID namespace, so nothing a grader starts outlives its call.

Frames are a 4-byte big-endian length and UTF-8 JSON, on the pipes that arrived as stdin and stdout (moved
to other fds before user code runs). This side trusts the parent; the parent trusts nothing from here: user
code owns this process and can rewrite any of it, so the checks here exist for clear messages only.

Only the standard library: this file is bound alone into the sandbox, where rft itself is not importable.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import struct
import sys
import time
import types
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 512 * 1024**2
GRADER_FILENAME = "grader.py"
MAX_TEXT = 2000

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

_libc = ctypes.CDLL(None, use_errno=True)


def encode_frame(message: dict[str, Any], allow_nan: bool = False) -> bytes:
    # ensure_ascii: a lone surrogate (legal in a str, e.g. from a "\ud800" escape) still encodes.
    body = json.dumps(message, separators=(",", ":"), allow_nan=allow_nan).encode()
    return HEADER.pack(len(body)) + body


def _read_exact(fd: int, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any]:
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    if size > MAX_REQUEST_BYTES:
        raise EOFError
    message: dict[str, Any] = json.loads(_read_exact(fd, size))
    return message


def write_frame(fd: int, message: dict[str, Any]) -> None:
    data = memoryview(encode_frame(message))
    while data:
        data = data[os.write(fd, data) :]


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _set_limits(limits: dict[str, int]) -> list[str]:
    wanted = {
        "RLIMIT_AS": limits["memory_bytes"],
        "RLIMIT_CPU": limits["cpu_s"],
        "RLIMIT_FSIZE": limits["max_file_bytes"],
        "RLIMIT_NOFILE": limits["max_open_files"],
        "RLIMIT_CORE": 0,
        # Counted per uid in a user namespace: a uid of its own (root mode), or a user namespace of its own.
        "RLIMIT_NPROC": limits["max_processes"],
    }
    missing = []
    for name, value in wanted.items():
        which = getattr(resource, name)
        try:
            hard = resource.getrlimit(which)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as exc:
            missing.append(f"{name} ({exc})")
    return missing


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError("the uid/gid switch did not take")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("root could be regained after the uid switch")


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def unconfined() -> list[str]:
    """The protections this process lacks, read back from the kernel rather than assumed."""
    status, missing = _status(), []
    if (os.getpid(), os.getppid()) != (2, 1):
        missing.append(f"a PID namespace of its own (it is pid {os.getpid()}, child of {os.getppid()})")
    if status.get("Seccomp", "0").strip() != "2":
        missing.append("the seccomp filter")
    if status.get("NoNewPrivs", "0").strip() != "1":
        missing.append("no_new_privs")
    if int(status.get("CapEff", "1").strip(), 16) or int(status.get("CapPrm", "1").strip(), 16):
        missing.append(f"dropping every capability (CapEff {status.get('CapEff', '?').strip()})")
    if os.getuid() == 0 or os.geteuid() == 0:
        missing.append("an unprivileged uid")
    with open("/proc/net/dev") as f:
        interfaces = {line.split(":")[0].strip() for line in f.read().splitlines()[2:]}
    if interfaces - {"lo"}:
        missing.append(f"a network namespace of its own (it sees {', '.join(sorted(interfaces))})")
    return missing


def confine(config: dict[str, Any]) -> list[str]:
    """Apply the limits and the uid switch; return, in words, every protection that does not hold."""
    uid, gid, limits = config["uid"], config["gid"], config["limits"]
    missing = _set_limits(limits)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # bwrap set it already; a no-op then
        if uid is not None:
            _drop_privileges(uid, gid)  # never run user code as root: a failure here fails the start
            # The uid switch made us non-dumpable, which makes our own /proc/self/* root-owned and unreadable
            # to the grader. Only this uid's processes (the grader's own) could ptrace us; seccomp forbids it.
            _prctl(PR_SET_DUMPABLE, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # bwrap armed it; the uid switch cleared it
    except OSError as exc:
        missing.append(str(exc))
    sys.dont_write_bytecode = True
    os.environ.pop("PWD", None)  # bwrap's --chdir sets it; the grader's environment is exactly what the pool set
    return missing + unconfined()


def _text(value: Callable[[], object], fallback: str) -> str:
    try:
        text = str(value())
    except Exception:
        return fallback
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def grader_line(tb: types.TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == GRADER_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def describe(exc: BaseException, limits: dict[str, int]) -> str:
    name = _text(lambda: type(exc).__name__, "an exception")
    detail = _text(lambda: exc, "<unprintable>")
    text = f"{name}: {detail}" if detail else name
    line = grader_line(exc.__traceback__)
    where = f" (line {line})" if line else ""
    if isinstance(exc, MemoryError):
        gib = limits["memory_bytes"] / 1024**3
        return f"ran out of memory (the sandbox allows {gib:g} GiB of address space): {text}{where}"
    return f"raised {text}{where}"


def _numpy_number_types() -> set[type]:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return set()
    try:
        kinds = (numpy.integer, numpy.floating)
        return {t for t in set(numpy.sctypeDict.values()) if isinstance(t, type) and issubclass(t, kinds)}
    except Exception:
        return set()


def to_score(value: object) -> tuple[float | None, str | None]:
    """The grade as a float, or why it is not one. Only exact known types are converted: a user type's
    `__float__` (a float subclass's included) could return anything."""
    kind = type(value)
    name = _text(lambda: kind.__qualname__, "object")
    advice = "return a finite float (an int or a numpy number is fine too)"
    if kind is bool:
        return None, f"grade() returned a bool ({value}); return a number such as 1.0 or 0.0"
    if value is None:
        return None, f"grade() returned None (is a `return` missing?); {advice}"
    if kind is str:
        return None, f"grade() returned a str ({_text(lambda: repr(value)[:60], '?')}); {advice}"
    if kind is not int and kind is not float and kind not in _numpy_number_types():
        subclass = " (a float subclass, whose __float__ is not trusted)" if isinstance(value, float) else ""
        return None, f"grade() returned a {name}{subclass}; {advice}"
    try:
        number = float(value)  # type: ignore[arg-type]  # int, float or an exact numpy number type
    except (OverflowError, ValueError, TypeError) as exc:
        return None, f"grade() returned a {name} that is not a usable float ({exc}); {advice}"
    if math.isnan(number):
        return None, "grade() returned NaN; return a finite float"
    if math.isinf(number):
        return None, f"grade() returned {number}; return a finite float"
    return number, None


def kill_strays() -> None:
    """Kill every process the grader left behind, and reap them. In our own PID namespace, kill(-1) reaches
    every other process in it but its init: all of them the grader's."""
    if os.getpid() == 2:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    _reap(2.0)


def _reap(budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)


def load(source: str) -> tuple[Callable[..., object] | None, str | None]:
    module = types.ModuleType("grader")
    module.__file__ = GRADER_FILENAME
    sys.modules["grader"] = module
    try:
        exec(compile(source, GRADER_FILENAME, "exec"), module.__dict__)
    except BaseException as exc:
        return None, exc_text(exc)
    grade = module.__dict__.get("grade")
    if not callable(grade):
        return None, "the grader source defines no callable grade(sample, item)"
    return grade, None


def exc_text(exc: BaseException) -> str:
    line = grader_line(exc.__traceback__)
    name = _text(lambda: type(exc).__name__, "an exception")
    where = f" (line {line})" if line else ""
    return f"loading the grader raised {name}: {_text(lambda: exc, '<unprintable>')}{where}"


def run_one(grade: Callable[..., object], request: dict[str, Any], limits: dict[str, int]) -> dict[str, Any]:
    try:
        value = grade(request["sample"], request["item"])
    except BaseException as exc:
        return {"error": f"grade() {describe(exc, limits)}", "recycle": isinstance(exc, MemoryError)}
    score, error = to_score(value)
    return {"score": score} if error is None else {"error": error}


def mute_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def serve(requests: int, replies: int) -> None:
    config = read_frame(requests)
    missing = confine(config)
    limits = config["limits"]
    write_frame(replies, {"type": "ready", "missing": missing})
    source = read_frame(requests)["source"]
    mute_stdio()
    me = os.getpid()
    grade, error = load(source)
    if os.getpid() != me:
        os._exit(0)  # a fork made by module-level code must not speak for the worker
    kill_strays()
    if grade is None:
        write_frame(replies, {"type": "load_error", "error": error})
        return
    write_frame(replies, {"type": "loaded"})
    while True:
        request = read_frame(requests)
        reply = run_one(grade, request, limits)
        if os.getpid() != me:
            os._exit(0)  # same for a fork made inside grade()
        kill_strays()
        if time.process_time() > limits["cpu_s"] / 2:
            reply["recycle"] = True  # retire well before RLIMIT_CPU would kill us mid-call
        write_frame(replies, {"type": "result", "id": request["id"], **reply})
        if reply.get("recycle"):
            return


def main() -> None:
    requests, replies = os.dup(0), os.dup(1)  # non-inheritable copies; 0 and 1 become /dev/null
    try:
        serve(requests, replies)
    except (EOFError, BrokenPipeError):
        pass  # the parent closed the pipe: shut down
    finally:
        kill_strays()


if __name__ == "__main__":
    main()
