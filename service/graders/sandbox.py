"""Run user-supplied `python` graders in sandbox processes, never in the API or worker process.

A `PythonGraderPool` keeps warm sandbox processes (sandbox_worker.py) that all run ONE grader source, so a
grader that corrupts its own process can only spoil its own rewards. What a sandbox can see and do is
isolation.py's: a fresh allowlisted root from bubblewrap, its own namespaces, a seccomp filter. The parent
enforces the wall-time limit, treats every byte from a sandbox as hostile (bounded frames, strict JSON,
type-checked replies), and kills and replaces a sandbox after any timeout, death or protocol violation.

Uids (when the service runs as root): every sandbox process gets a uid of its own, never reused while it
lives: SANDBOX_UID_BASE + blake2b(parent pid, pool serial, slot, incarnation) mod SANDBOX_UID_SPAN, skipping
uids that any live process holds (gid = uid, no supplementary groups, no passwd entry). Owning its uid alone
is what makes RLIMIT_NPROC contain fork bombs, keeps other processes' /proc/<pid>/environ unreadable, and
makes "kill every process of this uid" (kill(-1) run as that uid) exactly "kill what this grader started".
Without root, a user namespace of its own does the same for RLIMIT_NPROC, and its PID namespace for kill(-1).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import select
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from service.core.settings import get_settings
from service.graders.isolation import Isolation, isolation_for
from service.graders.sandbox_worker import HEADER, encode_frame

log = logging.getLogger(__name__)

MAX_SOURCE_BYTES = 256 * 1024
MAX_REPLY_BYTES = 1024**2
MAX_MESSAGE_CHARS = 4000
START_TIMEOUT_S = 60.0  # interpreter start plus the grader's module-level code (imports of scipy & co.)
SANDBOX_UID_BASE = 2**30
SANDBOX_UID_SPAN = 2**29
RUNTIME_ERROR = "python_grader_runtime_error"
SERVER_ERROR = "python_grader_server_error"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

_pool_serials = itertools.count()
_live_uids: set[int] = set()
_uid_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall time per grade() call
    memory_bytes: int = 2 * 1024**3  # RLIMIT_AS
    cpu_s: int = 3600  # RLIMIT_CPU backstop over a worker's life (it retires itself at half)
    max_processes: int = 8  # RLIMIT_NPROC for the sandbox uid
    max_file_bytes: int = 64 * 1024**2  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    tmp_bytes: int = 64 * 1024**2  # the private tmpfs /tmp (its pages are memory, outside RLIMIT_AS)


@dataclass(frozen=True)
class GradeOutcome:
    score: float | None  # None when error_type is set
    error_type: str | None = None  # RUNTIME_ERROR (the grader's fault) or SERVER_ERROR (ours)
    error: str | None = None


def _failure(error_type: str, message: str) -> GradeOutcome:
    # The text is the grader's own words; it must still survive UTF-8 encoding and a PostgreSQL text column.
    clean = message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace").decode().replace("\x00", "\\x00")
    return GradeOutcome(None, error_type, clean)


def validate_source(source: str) -> None:
    """Raise ValueError with a clear message if `source` is too big, not valid Python (with the line), or
    lacks a top-level `def grade(sample, item)` callable with two arguments. Never executes it."""
    if not isinstance(source, str):
        raise ValueError(f"source must be a string of Python code, not {type(source).__name__}")
    try:
        size = len(source.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"source is not valid UTF-8 text: {exc.reason} at character {exc.start}") from None
    if size > MAX_SOURCE_BYTES:
        raise ValueError(f"source is {size} bytes; the limit is {MAX_SOURCE_BYTES} bytes (256 kB)")
    try:
        tree = ast.parse(source, filename="grader.py")
    except SyntaxError as exc:
        raise ValueError(f"source is not valid Python: {exc.msg} (line {exc.lineno}, column {exc.offset})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"source cannot be parsed as Python: {exc}") from None
    grades = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "grade"]
    if not grades:
        raise ValueError("source defines no top-level function grade; define `def grade(sample, item) -> float:`")
    grade = grades[-1]  # the last definition is the one that counts
    if isinstance(grade, ast.AsyncFunctionDef):
        raise ValueError(f"grade must be a plain function, not `async def` (line {grade.lineno})")
    args = grade.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    required_kw = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if required > 2 or (positional < 2 and args.vararg is None) or required_kw:
        raise ValueError(
            f"grade must take 2 parameters, grade(sample, item); it takes {positional}"
            + (f" plus keyword-only {', '.join(required_kw)}" if required_kw else "")
            + f" (line {grade.lineno})"
        )


class _Broken(Exception):
    """A sandbox broke the protocol or went away; `died` says which."""

    def __init__(self, reason: str, died: bool = False) -> None:
        super().__init__(reason)
        self.died = died


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Broken(f"it sent a frame that is not strict UTF-8 JSON ({str(exc)[:200]})") from None


def _proc_statuses() -> list[tuple[int, list[int], str]]:
    """(pid, [real, effective, saved, fs uid], state letter) of every process."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                lines = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            found.append((int(name), [int(u) for u in lines["Uid"].split()], lines["State"].strip()[:1]))
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile
    return found


def pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes that hold `uid` in any of their uids."""
    return [pid for pid, uids, state in _proc_statuses() if uid in uids and state != "Z"]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _sandbox_uid(pool_serial: int, slot: int, incarnation: int) -> int:
    in_use = {u for _, uids, _ in _proc_statuses() for u in uids}
    with _uid_lock:
        for attempt in itertools.count():
            key = f"{os.getpid()}:{pool_serial}:{slot}:{incarnation}:{attempt}".encode()
            uid = SANDBOX_UID_BASE + int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) % SANDBOX_UID_SPAN
            if uid not in in_use and uid not in _live_uids:
                _live_uids.add(uid)
                return uid
    raise AssertionError("unreachable")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a sandbox uid. kill(-1) as that uid is atomic against a fork bomb, which
    chasing pids one by one is not; /bin/sh's builtin kill does it without needing Python to be reachable."""
    assert uid >= SANDBOX_UID_BASE, uid
    for attempt in range(10):
        if not pids_of_uid(uid):
            return
        try:
            subprocess.run(
                ["/bin/sh", "-c", "kill -KILL -1"],
                user=uid,
                group=uid,
                extra_groups=[],
                env={},
                cwd="/",
                timeout=10,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            for pid in pids_of_uid(uid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.002 * attempt)
    log.warning("processes of sandbox uid %d survived SIGKILL: %s", uid, pids_of_uid(uid))


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Worker:
    """One sandbox process seen from the parent: its pipes, where it is in the protocol, what to kill."""

    def __init__(self, slot: int, uid: int | None, argv: list[str], seccomp: bytes, spawner: ThreadPoolExecutor):
        self.slot, self.uid = slot, uid
        self.state = "starting"  # -> loading -> idle <-> busy
        self.deadline: float | None = time.monotonic() + START_TIMEOUT_S
        self.call: int | None = None
        self.call_id = -1
        self.out, self.out_pos, self.inbuf = b"", 0, bytearray()
        fds: list[int] = []
        try:
            req_r, self.to_fd = os.pipe()
            self.from_fd, rep_w = os.pipe()
            self.err_fd, err_w = os.pipe()
            filter_r, filter_w = os.pipe()
            fds = [req_r, self.to_fd, self.from_fd, rep_w, self.err_fd, err_w, filter_r, filter_w]
            os.write(filter_w, seccomp)  # a few hundred bytes: far below a pipe's buffer
            os.close(filter_w)
            fds.remove(filter_w)
            env = {v: "1" for v in THREAD_VARS} | {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
            env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
            # Popen runs on the pool's long-lived thread: PR_SET_PDEATHSIG (bwrap's --die-with-parent) fires
            # when the *thread* that forked the sandbox ends, so it must be one that lives as long as the pool.
            self.popen = spawner.submit(
                lambda: subprocess.Popen(
                    [arg.replace("{seccomp_fd}", str(filter_r)) for arg in argv],
                    stdin=req_r,
                    stdout=rep_w,
                    stderr=err_w,
                    env=env,
                    cwd="/",
                    close_fds=True,
                    pass_fds=(filter_r,),
                    start_new_session=True,
                )
            ).result()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (req_r, rep_w, err_w, filter_r):
            os.close(fd)
        for fd in (self.to_fd, self.from_fd, self.err_fd):
            os.set_blocking(fd, False)

    def send(self, frame: bytes) -> None:
        self.out, self.out_pos = frame, 0
        self.flush()

    def flush(self) -> None:
        try:
            self.out_pos += os.write(self.to_fd, memoryview(self.out)[self.out_pos :])
        except BlockingIOError:
            return
        except OSError as exc:
            raise _Broken(f"it stopped reading requests ({exc.strerror})", died=True) from None
        if self.out_pos == len(self.out):
            self.out, self.out_pos = b"", 0

    def read_frames(self) -> list[Any]:
        try:
            chunk = os.read(self.from_fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise _Broken(f"its pipe failed ({exc.strerror})", died=True) from None
        if not chunk:
            raise _Broken("it closed its pipe", died=True)
        self.inbuf += chunk
        frames = []
        while len(self.inbuf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.inbuf)
            if size > MAX_REPLY_BYTES:
                raise _Broken(f"it announced a {size}-byte frame; the limit is {MAX_REPLY_BYTES}")
            if len(self.inbuf) < HEADER.size + size:
                break
            frames.append(_parse(bytes(self.inbuf[HEADER.size : HEADER.size + size])))
            del self.inbuf[: HEADER.size + size]
        return frames

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            return os.read(self.err_fd, 1 << 16).decode(errors="replace").strip()[-1500:]
        return ""

    def kill(self) -> str:
        """Kill the sandbox and everything it started (its tmpfs goes with it); say how it ended."""
        tail = self.stderr_tail()
        with contextlib.suppress(OSError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("grader sandbox %d did not die within 10s of SIGKILL", self.popen.pid)
        if self.uid is not None:
            _kill_uid(self.uid)
            with _uid_lock:
                _live_uids.discard(self.uid)
        for fd in (self.to_fd, self.from_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        return _how_it_ended(self.popen.returncode) + (f"; its stderr: {tail}" if tail else "")


def _result(frame: Any, call_id: int) -> tuple[GradeOutcome, bool]:
    """The outcome a `result` frame carries, and whether the sandbox asked to be retired."""
    if (
        not isinstance(frame, dict)
        or frame.get("type") != "result"
        or set(frame) - {"type", "id", "score", "error", "recycle"}
    ):
        raise _Broken("it sent a frame that is not a result")
    if type(frame.get("id")) is not int or frame["id"] != call_id:
        raise _Broken(f"it answered call {str(frame.get('id'))[:40]!r} while call {call_id} was running")
    recycle = frame.get("recycle", False)
    if type(recycle) is not bool:
        raise _Broken("it sent a result whose `recycle` is not a boolean")
    score, error = frame.get("score"), frame.get("error")
    if ("score" in frame) == ("error" in frame):
        raise _Broken("it sent a result with neither or both of `score` and `error`")
    if "error" in frame:
        if not isinstance(error, str):
            raise _Broken("it sent a result whose `error` is not a string")
        return _failure(RUNTIME_ERROR, error), recycle
    if not isinstance(score, int | float) or isinstance(score, bool):  # json gives exact int/float only
        raise _Broken(f"it sent a score of type {type(score).__name__}")
    try:
        value = float(score)
    except OverflowError:
        raise _Broken("it sent a score too large for a float") from None
    if not math.isfinite(value):
        raise _Broken("it sent a score that is not finite")
    return GradeOutcome(value), recycle


def _check_ready(frame: dict[str, Any]) -> None:
    missing = frame.get("missing")
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise _Broken("it sent a `ready` frame without a list of missing protections")
    if missing:  # never run a grader with less than the whole sandbox
        raise _Broken("it lacks protections a python grader never runs without: " + "; ".join(m[:300] for m in missing))


def _shutdown(owner_pid: int, slots: list[_Worker | None], spawner: ThreadPoolExecutor) -> None:
    if os.getpid() != owner_pid:
        return  # a forked copy of the pool: the sandboxes belong to the parent
    for slot, worker in enumerate(slots):
        if worker is not None:
            slots[slot] = None
            worker.kill()
    spawner.shutdown(wait=False)


class PythonGraderPool:
    """A warm pool of sandbox processes that all run ONE grader source (a pool never mixes sources).

    `grade_many` spreads calls over the sandboxes and returns outcomes in call order; a sandbox that times
    out, dies or breaks the protocol is killed with everything it started and replaced on the next call.
    Thread-safe (calls serialize); use it in the process that created it, not in a fork of it."""

    def __init__(
        self,
        source: str,
        size: int | None = None,
        limits: SandboxLimits = SandboxLimits(),
        isolation: Isolation | None = None,
    ) -> None:
        """`isolation` defaults to the one the global settings describe; SandboxUnavailable if there is none."""
        validate_source(source)
        self.size = size if size is not None else min(4, os.cpu_count() or 1)
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.limits = limits
        self.isolation = isolation or isolation_for(get_settings())
        self._argv = self.isolation.command(limits.tmp_bytes, "{seccomp_fd}")
        self._load_frame = encode_frame({"type": "load", "source": source})
        self._serial, self._incarnations, self._ids = next(_pool_serials), itertools.count(), itertools.count()
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._slots: list[_Worker | None] = [None] * self.size
        self._load_error: GradeOutcome | None = None  # module-level code raised: it would raise every time
        self._start_errors: dict[int, GradeOutcome] = {}  # slots that failed to start or load, in this batch
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="grader-sandbox-spawner")
        self._finalizer = weakref.finalize(self, _shutdown, self._owner_pid, self._slots, self._spawner)
        for slot in range(self.size):  # start now, so start-up overlaps whatever the caller does next
            self._spawn(slot)

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> GradeOutcome:
        return self.grade_many([(sample, item)])[0]

    def grade_many(self, calls: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[GradeOutcome]:
        """Grade every (sample, item) in parallel across the pool; outcome i belongs to call i."""
        if os.getpid() != self._owner_pid:
            raise RuntimeError("a PythonGraderPool cannot be used in a forked child; create one in this process")
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this PythonGraderPool is closed")
            requests = [self._request(i, sample, item) for i, (sample, item) in enumerate(calls)]
            self._start_errors.clear()
            return self._run(requests)

    def sandbox_pids(self) -> list[int]:
        """Host pids of every process of this pool's sandboxes (each bwrap launcher and what runs under it)."""
        found, todo = [], [w.popen.pid for w in self._slots if w is not None]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in _listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        return found

    def close(self) -> None:
        """Kill every sandbox process and remove its files. Idempotent."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> PythonGraderPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, index: int, sample: dict[str, Any], item: dict[str, Any]) -> tuple[int, bytes]:
        call_id = next(self._ids)
        try:
            message = {"type": "grade", "id": call_id, "sample": sample, "item": item}
            return call_id, encode_frame(message, allow_nan=True)  # NaN in an item is data, not our problem
        except (TypeError, ValueError) as exc:
            raise TypeError(f"call {index}: sample and item must be JSON-serializable: {exc}") from None

    def _spawn(self, slot: int) -> _Worker | None:
        privileged = self.isolation.privileged
        uid = _sandbox_uid(self._serial, slot, next(self._incarnations)) if privileged else None
        worker: _Worker | None = None
        try:
            worker = _Worker(slot, uid, self._argv, self.isolation.seccomp, self._spawner)
            config = {k: v for k, v in asdict(self.limits).items() if k not in ("timeout_s", "tmp_bytes")}
            worker.send(encode_frame({"type": "config", "uid": uid, "gid": uid, "limits": config}))
        except (OSError, subprocess.SubprocessError, _Broken, RuntimeError) as exc:
            # A sandbox that dies at once (bwrap refused by the kernel, say) says why on its stderr.
            ended = f" ({worker.kill()})" if worker is not None else ""
            if uid is not None:
                with _uid_lock:
                    _live_uids.discard(uid)
            log.exception("could not start a python grader sandbox")
            self._start_errors[slot] = _failure(SERVER_ERROR, f"the grader sandbox could not start: {exc}{ended}")
            return None
        self._slots[slot] = worker
        return worker

    def _run(self, requests: list[tuple[int, bytes]]) -> list[GradeOutcome]:
        results: list[GradeOutcome | None] = [None] * len(requests)
        pending = deque(range(len(requests)))
        while True:
            if self._load_error is not None:
                while pending:
                    results[pending.popleft()] = self._load_error
            self._assign(pending, requests, results)
            active = [w for w in self._slots if w is not None]
            if not pending and not any(w.state == "busy" for w in active):
                break  # sandboxes still starting carry on, and are picked up by the next batch
            if all(w.state == "idle" for w in active):  # calls are pending, yet no slot could start
                unstarted = next(iter(self._start_errors.values()), _failure(SERVER_ERROR, "no sandbox is running"))
                for index in pending:
                    results[index] = unstarted
                break
            self._step(active, results)
        return [r if r is not None else _failure(SERVER_ERROR, "the call was never answered") for r in results]

    def _assign(
        self, pending: deque[int], requests: list[tuple[int, bytes]], results: list[GradeOutcome | None]
    ) -> None:
        for slot in range(self.size):
            if not pending:
                return
            worker = self._slots[slot]
            if worker is None and slot not in self._start_errors and self._load_error is None:
                worker = self._spawn(slot)
            if worker is not None and worker.state == "idle":
                worker.call = pending.popleft()
                worker.call_id, frame = requests[worker.call]
                worker.state, worker.deadline = "busy", time.monotonic() + self.limits.timeout_s
                try:
                    worker.send(frame)
                except _Broken as exc:
                    self._broken(worker, exc, results)

    def _step(self, active: list[_Worker], results: list[GradeOutcome | None]) -> None:
        poller, owners = select.poll(), {}
        for worker in active:
            poller.register(worker.from_fd, select.POLLIN)
            owners[worker.from_fd] = worker
            if worker.out:
                poller.register(worker.to_fd, select.POLLOUT)
                owners[worker.to_fd] = worker
        deadlines = [w.deadline for w in active if w.deadline is not None and w.state != "idle"]
        wait_ms = max(0, math.ceil((min(deadlines) - time.monotonic()) * 1000)) if deadlines else None
        for fd, _ in poller.poll(wait_ms):
            worker = owners[fd]
            if self._slots[worker.slot] is not worker:
                continue  # retired earlier in this round
            try:
                if fd == worker.to_fd:
                    worker.flush()
                else:
                    for frame in worker.read_frames():
                        self._on_frame(worker, frame, results)
            except _Broken as exc:
                self._broken(worker, exc, results)
        now = time.monotonic()
        for worker in active:
            current = self._slots[worker.slot] is worker
            if current and worker.state != "idle" and worker.deadline is not None and now >= worker.deadline:
                self._timed_out(worker, results)

    def _on_frame(self, worker: _Worker, frame: Any, results: list[GradeOutcome | None]) -> None:
        if self._slots[worker.slot] is not worker:
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if worker.state == "starting" and kind == "ready":
            _check_ready(frame)
            worker.state, worker.deadline = "loading", time.monotonic() + START_TIMEOUT_S
            worker.send(self._load_frame)
        elif worker.state == "loading" and kind == "loaded" and len(frame) == 1:
            worker.state, worker.deadline = "idle", None
        elif worker.state == "loading" and kind == "load_error" and isinstance(frame.get("error"), str):
            self._load_error = _failure(RUNTIME_ERROR, frame["error"])
            self._retire(worker)
        elif worker.state == "busy" and worker.call is not None:
            results[worker.call], recycle = _result(frame, worker.call_id)
            worker.state, worker.call, worker.deadline = "idle", None, None
            if recycle:
                self._retire(worker)
        else:
            raise _Broken(f"it sent an unexpected {str(kind)[:40]!r} frame while {worker.state}")

    def _broken(self, worker: _Worker, exc: _Broken, results: list[GradeOutcome | None]) -> None:
        state, call = worker.state, worker.call
        how = self._retire(worker)
        if state == "starting":
            self._start_errors[worker.slot] = _failure(
                SERVER_ERROR, f"the grader sandbox could not start: {exc} ({how})"
            )
            log.error("python grader sandbox failed to start: %s (%s)", exc, how)
        elif state == "loading":  # not cached like a load_error: it may not happen again
            message = f"loading the grader failed: the sandbox process {how} while module-level code ran"
            self._start_errors[worker.slot] = _failure(RUNTIME_ERROR, message)
        elif state == "busy" and call is not None and exc.died:
            message = f"the sandbox process died while grade() ran ({how}); the grader may have exceeded a limit"
            results[call] = _failure(RUNTIME_ERROR, f"{message} ({self._limits_text()}) or crashed the interpreter")
        elif state == "busy" and call is not None:
            message = (
                f"grade() broke the sandbox protocol: {exc}; a grader must not write to inherited file descriptors"
            )
            results[call] = _failure(RUNTIME_ERROR, message)

    def _timed_out(self, worker: _Worker, results: list[GradeOutcome | None]) -> None:
        state, call = worker.state, worker.call
        self._retire(worker)
        if state == "starting":
            self._start_errors[worker.slot] = _failure(
                SERVER_ERROR, f"the grader sandbox did not start within {START_TIMEOUT_S:g}s"
            )
        elif state == "loading":
            message = f"loading the grader timed out after {START_TIMEOUT_S:g}s; module-level code must finish sooner"
            self._start_errors[worker.slot] = _failure(RUNTIME_ERROR, message)
        elif call is not None:
            results[call] = _failure(RUNTIME_ERROR, f"grade() timed out after {self.limits.timeout_s}s")

    def _retire(self, worker: _Worker) -> str:
        self._slots[worker.slot] = None
        return worker.kill()

    def _limits_text(self) -> str:
        limits = self.limits
        return f"memory {limits.memory_bytes / 1024**3:g} GiB, CPU {limits.cpu_s}s, {limits.max_processes} processes"
