"""The sandbox process that runs one user-supplied `python` grader (sandbox.py starts and drives it).

Lifecycle: read a `config` frame; confine this process (network namespace, private mount namespace,
resource limits, its own unprivileged uid) BEFORE anything of the user is read; answer `ready` naming any
protection that could not be applied; read the `load` frame, point fds 0-2 at /dev/null, compile and exec
the source once; then answer `grade` frames until the parent closes the pipe. After every grade() it kills
every other process of its uid, so nothing a grader starts outlives its call.

Frames are a 4-byte big-endian length and UTF-8 JSON, on the pipes that arrived as stdin and stdout (moved
to other fds before user code runs). This side trusts the parent; the parent trusts nothing from here: user
code owns this process and can rewrite any of it, so the checks here exist for clear messages only.

The mount namespace hides /run, /tmp and /dev/shm behind fresh tmpfs (their unix sockets, e.g. PostgreSQL's,
would otherwise bypass the network namespace), mounts a /proc whose other-uid entries are unreadable, and,
when the Python installation sits under a directory others cannot enter (a pyenv in a 0700 /root), covers
that directory with a tmpfs that shows only the path to Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import stat
import struct
import sys
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 512 * 1024**2
GRADER_FILENAME = "grader.py"
MAX_TEXT = 2000

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
HIDDEN_DIRS = {"/run": "mode=0755,size=64k", "/tmp": "mode=1777", "/dev/shm": "mode=1777"}

_libc = ctypes.CDLL(None, use_errno=True)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_own_uid: int | None = None  # set once this process runs as a uid of its own; then kill(-1) is safe


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


def _mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    def arg(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _check(_libc.mount(arg(source), arg(target), arg(fstype), flags, arg(options)), f"mount {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _is_under(path: str, directory: str) -> bool:
    return path != directory and path.startswith(directory.rstrip("/") + "/")


def _overmount(directory: str, keep: Iterable[str], options: str) -> None:
    """Cover `directory` with an empty tmpfs, then bind back the entries of it that lead to each kept path."""
    names = {os.path.relpath(p, directory).split("/")[0] for p in keep if _is_under(p, directory)}
    originals = {name: os.path.join(directory, name) for name in names}
    links = {name: os.readlink(path) for name, path in originals.items() if os.path.islink(path)}
    fds = {name: os.open(path, os.O_PATH) for name, path in originals.items() if name not in links}
    try:
        _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    except OSError:
        _close_all(fds.values())
        raise
    try:
        for name, target in links.items():
            os.symlink(target, os.path.join(directory, name))
        for name, fd in fds.items():
            path = os.path.join(directory, name)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(path)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    except OSError:
        _libc.umount2(directory.encode(), MNT_DETACH)  # all or nothing: never leave a half-covered directory
        raise
    finally:
        _close_all(fds.values())


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _python_paths() -> list[str]:
    paths = [p for p in sys.path if p and os.path.exists(p)]
    paths += [os.path.dirname(os.path.realpath(sys.executable)), sys.base_prefix, sys.base_exec_prefix]
    return sorted({os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths})


def _first_closed_ancestor(paths: Iterable[str]) -> str | None:
    """The shallowest directory on the way to a path that a stranger (not owner, not group) cannot enter."""
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                return ancestor
    return None


def _private_mounts(privileged: bool, limits: dict[str, int]) -> None:
    """Runs in a fresh mount namespace: nothing mounted here is seen by the host."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # never propagate a mount below back to the host
    keep = [os.getcwd(), *_python_paths()]
    for directory, options in HIDDEN_DIRS.items():  # tmpfs pages escape RLIMIT_AS, hence the size cap
        if os.path.isdir(directory) and not os.path.islink(directory):
            _overmount(directory, keep, options if "size" in options else f"{options},size={limits['max_file_bytes']}")
    if not privileged:
        return  # the same uid as the service: whatever it can enter, the sandbox can enter
    for _ in range(16):
        closed = _first_closed_ancestor(keep)
        if closed is None:
            break
        if closed == "/":
            raise OSError(f"/ is not searchable by others (mode {os.stat('/').st_mode & 0o777:o})")
        _overmount(closed, keep, "mode=0755,size=64k")
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if release >= (5, 8):  # before 5.8 proc options were shared with the host's /proc
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=1")


def _set_limits(limits: dict[str, int], with_nproc: bool) -> list[str]:
    wanted = {
        "RLIMIT_AS": limits["memory_bytes"],
        "RLIMIT_CPU": limits["cpu_s"],
        "RLIMIT_FSIZE": limits["max_file_bytes"],
        "RLIMIT_NOFILE": limits["max_open_files"],
        "RLIMIT_CORE": 0,
    }
    if with_nproc:  # counted per uid: without a uid (or user namespace) of its own it would count the service's
        wanted["RLIMIT_NPROC"] = limits["max_processes"]
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
    global _own_uid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError("the uid/gid switch did not take")
    try:
        os.setuid(0)
    except PermissionError:
        _own_uid = uid
        return
    raise OSError("root could be regained after the uid switch")


def _enter_namespaces(privileged: bool, limits: dict[str, int]) -> tuple[bool, list[str]]:
    """New network and mount namespaces; without root, inside a new user namespace that maps our own ids."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWNET | CLONE_NEWNS | (0 if privileged else CLONE_NEWUSER)) != 0:
        reason = os.strerror(ctypes.get_errno())
        return False, [f"network isolation and hidden /run, /tmp and /dev/shm (unshare failed: {reason})"]
    missing = []
    try:
        if not privileged:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        _private_mounts(privileged, limits)
    except OSError as exc:
        if privileged:
            raise  # half-done mounts could leave Python unreachable; fail the start instead
        missing.append(f"hidden /run, /tmp and /dev/shm ({exc.strerror})")
    if not privileged:  # the user namespace gave us every capability in it: keep none (umount would undo the above)
        header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        if _libc.capset(ctypes.byref(header), data) != 0:
            missing.append(f"dropping capabilities ({os.strerror(ctypes.get_errno())})")
    return True, missing


def confine(config: dict[str, Any]) -> list[str]:
    """Apply every protection this process can get; return the ones it could not, in words."""
    uid, gid, limits = config["uid"], config["gid"], config["limits"]
    privileged = uid is not None
    namespaced, missing = _enter_namespaces(privileged, limits)
    missing += _set_limits(limits, with_nproc=privileged or namespaced)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
    for option in (PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER):  # no setuid binaries; orphans reparent to us
        try:
            _prctl(option, 1)
        except OSError as exc:
            missing.append(str(exc))
    if privileged:
        _drop_privileges(uid, gid)  # never run user code as root: a failure here fails the start
        # The uid switch made us non-dumpable, which makes our own /proc/self/* root-owned and unreadable to
        # the grader. Only this uid's processes (the grader's own) could ptrace us; RLIMIT_CORE is 0.
        _prctl(PR_SET_DUMPABLE, 1)
    else:
        missing.append("a dedicated uid (the service is not root): the grader can read what the service can")
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after the uid switch, which clears it
    if os.getppid() != config["parent_pid"]:
        os._exit(1)  # the parent died before PDEATHSIG was armed
    sys.dont_write_bytecode = True
    return missing


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
    """Kill every process the grader left behind, and reap them."""
    if _own_uid is not None and _own_uid != 0 and os.getuid() == _own_uid:
        # Linux: every process this uid may signal, i.e. every process of this uid, but not the caller
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    else:  # no uid of our own: kill(-1) would hit the service; orphans reparent to us (subreaper), so walk down
        for _ in range(5):
            found = _descendants(os.getpid())
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _reap(0.2)
    _reap(2.0)


def _descendants(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


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
        if os.getuid() != 0:  # still root: confinement never ran, so no user code ran either
            kill_strays()


if __name__ == "__main__":
    main()
