"""The python grader sandbox: user code runs confined in its own processes, every attack ends as a clear
outcome for that call only, and the very next call on the same pool still works."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings, get_settings
from service.graders.isolation import Isolation, isolation_for
from service.graders.sandbox import GradeOutcome, PythonGraderPool, SandboxLimits, validate_source
from tests.test_sandbox_attacks import tmp_entries

RUNTIME = "python_grader_runtime_error"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per sandbox needs root")

MakePool = Callable[..., PythonGraderPool]


def grader(body: str) -> str:
    """A grader whose `body` runs unless item["probe"] asks for the sandbox's uid, a token drawn when the
    sandbox started (it tells sandboxes apart: each is PID 1 of its own namespace), or a plain 0.5."""
    head = """\
        import os, random, sys, time
        TOKEN = random.random()

        def grade(sample, item):
            probe = item.get("probe")
            if probe == "ok":
                return 0.5
            if probe == "uid":
                return float(os.getuid())
            if probe == "token":
                return TOKEN
        """
    return textwrap.dedent(head) + textwrap.indent(textwrap.dedent(body), "    ")


@pytest.fixture
def make_pool() -> Iterator[MakePool]:
    pools: list[PythonGraderPool] = []

    def make(body: str, size: int = 1, **limits: Any) -> PythonGraderPool:
        pool = PythonGraderPool(grader(body), size=size, limits=SandboxLimits(**{"timeout_s": 1.0, **limits}))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def assert_healthy(pool: PythonGraderPool) -> None:
    assert pool.grade({}, {"probe": "ok"}) == GradeOutcome(0.5)


def assert_runtime_error(outcome: GradeOutcome, *fragments: str) -> None:
    assert outcome.score is None and outcome.error_type == RUNTIME, outcome
    for fragment in fragments:
        assert fragment in (outcome.error or ""), outcome


def processes_of_uid(uid: int) -> dict[int, str]:
    """pid -> name of every live (not zombie) process holding `uid`, read straight from /proc."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if str(uid) in status["Uid"].split() and not status["State"].strip().startswith("Z"):
            found[int(pid)] = status["Name"].strip()
    return found


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_grade_scores_from_sample_and_item(make_pool: MakePool) -> None:
    pool = make_pool("""\
        hit = sample["output_text"].strip() == item["answer"]
        return 0.75 if hit else 0.25 * item["weight"]
        """)
    assert pool.grade({"output_text": " 42 "}, {"answer": "42", "weight": 1}) == GradeOutcome(0.75)
    assert pool.grade({"output_text": "41"}, {"answer": "42", "weight": 2}) == GradeOutcome(0.5)


def test_large_samples_and_items_arrive_intact(make_pool: MakePool) -> None:
    pool = make_pool("return float(len(sample['output_text']) + len(item['blob']))\n", size=2, timeout_s=10.0)
    calls = [({"output_text": "é" * 3_000_000}, {"blob": "x" * 1_000_000})] * 3
    assert pool.grade_many(calls) == [GradeOutcome(4_000_000.0)] * 3


def test_odd_text_in_messages_and_items_is_carried_safely(make_pool: MakePool) -> None:
    pool = make_pool("raise ValueError(item['text'] + chr(0))\n")
    outcome = pool.grade({}, {"text": "bad \ud800 surrogate", "nan": float("nan")})
    assert_runtime_error(outcome, "grade() raised ValueError: bad ? surrogate\\x00 (line 12)")
    assert_healthy(pool)


def test_numpy_imports_under_the_default_memory_limit(make_pool: MakePool) -> None:
    pool = make_pool(
        """\
        import numpy as np
        return np.float32(np.mean(np.arange(5)) / 4)
        """,
        timeout_s=10.0,
        memory_bytes=SandboxLimits().memory_bytes,
    )
    assert pool.grade({}, {}) == GradeOutcome(0.5)
    assert_healthy(pool)


def test_int_and_numpy_scalar_returns_are_accepted(make_pool: MakePool) -> None:
    pool = make_pool(
        """\
        import numpy as np
        return {"int": 1, "i64": np.int64(2), "f64": np.float64(0.25)}[item["kind"]]
        """,
        timeout_s=10.0,
    )
    outcomes = pool.grade_many([({}, {"kind": k}) for k in ("int", "i64", "f64")])
    assert [o.score for o in outcomes] == [1.0, 2.0, 0.25]


def test_validate_source_names_the_syntax_error_line() -> None:
    with pytest.raises(ValueError, match=r"not valid Python: .*\(line 3, column"):
        validate_source("def grade(sample, item):\n    return 1.0\nif = 2\n")


def test_validate_source_requires_a_top_level_grade() -> None:
    with pytest.raises(ValueError, match="no top-level function grade"):
        validate_source("def score(sample, item):\n    return 1.0\n")
    with pytest.raises(ValueError, match="no top-level function grade"):
        validate_source("if True:\n    def grade(sample, item):\n        return 1.0\n")


def test_validate_source_requires_two_parameters() -> None:
    with pytest.raises(ValueError, match=r"grade must take 2 parameters, grade\(sample, item\); it takes 1 \(line 2\)"):
        validate_source("\ndef grade(sample):\n    return 1.0\n")
    with pytest.raises(ValueError, match="takes 3"):
        validate_source("def grade(sample, item, extra):\n    return 1.0\n")
    validate_source("def grade(sample, item, extra=None):\n    return 1.0\n")
    validate_source("def grade(*args):\n    return 1.0\n")


def test_validate_source_rejects_oversized_source() -> None:
    with pytest.raises(ValueError, match=r"the limit is 262144 bytes"):
        validate_source("def grade(sample, item):\n    return 1.0\n" + "#" * 300_000)


def test_pool_refuses_an_invalid_source() -> None:
    with pytest.raises(ValueError, match="no top-level function grade"):
        PythonGraderPool("x = 1\n")


def test_exception_in_grade_names_its_type_message_and_line(make_pool: MakePool) -> None:
    pool = make_pool("return 1 / 0\n")
    assert_runtime_error(pool.grade({}, {}), "grade() raised ZeroDivisionError: division by zero (line 12)")
    assert_healthy(pool)


def test_module_level_error_fails_every_call_without_a_restart_each_time() -> None:
    pool = PythonGraderPool("import no_such_module_here\n\ndef grade(sample, item):\n    return 1.0\n", size=1)
    try:
        expected = "loading the grader raised ModuleNotFoundError: No module named 'no_such_module_here' (line 1)"
        assert_runtime_error(pool.grade({}, {}), expected)
        started = time.monotonic()
        assert_runtime_error(pool.grade({}, {}), expected)
        assert time.monotonic() - started < 0.05
    finally:
        pool.close()


@pytest.mark.parametrize("body", ["while True:\n    pass\n", "time.sleep(100)\n"], ids=["busy_loop", "sleep"])
def test_slow_grade_times_out_and_the_sandbox_is_replaced(make_pool: MakePool, body: str) -> None:
    pool = make_pool(body)
    token = pool.grade({}, {"probe": "token"}).score
    started = time.monotonic()
    assert_runtime_error(pool.grade({}, {}), "grade() timed out after 1.0s")
    assert time.monotonic() - started < 3.0
    assert pool.grade({}, {"probe": "token"}).score != token
    assert_healthy(pool)


def test_timeout_in_a_batch_fails_only_its_own_call(make_pool: MakePool) -> None:
    pool = make_pool("time.sleep(item['s'])\nreturn item['s']\n", size=2)
    outcomes = pool.grade_many([({}, {"s": 30})] + [({}, {"s": 0.01})] * 6)
    assert_runtime_error(outcomes[0], "grade() timed out after 1.0s")
    assert outcomes[1:] == [GradeOutcome(0.01)] * 6
    assert_healthy(pool)


@pytest.mark.parametrize(
    "body",
    ["b = bytearray(3 * 1024**3)\n", "hoard = []\nwhile True:\n    hoard.append('x' * 10**7)\n"],
    ids=["one_huge_allocation", "growing_list"],
)
def test_memory_bomb_is_a_runtime_error_about_memory(make_pool: MakePool, body: str) -> None:
    pool = make_pool(body, timeout_s=5.0, memory_bytes=1024**3)
    outcome = pool.grade({}, {})
    assert_runtime_error(outcome, "MemoryError")
    assert "memory" in (outcome.error or "").lower() and "1 GiB" in (outcome.error or "")
    assert_healthy(pool)


@root_only
def test_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind(make_pool: MakePool) -> None:
    pool = make_pool("""\
        for _ in range(64):  # bounded, in case RLIMIT_NPROC were missing
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        return 1.0
        """)
    uid = int(pool.grade({}, {"probe": "uid"}).score or 0)
    assert_runtime_error(pool.grade({}, {}), "grade() raised BlockingIOError", "Resource temporarily unavailable")
    assert wait_until(lambda: len(processes_of_uid(uid)) == 1), processes_of_uid(uid)  # the worker alone
    assert_healthy(pool)


@root_only
def test_child_left_running_is_killed_after_the_call(make_pool: MakePool) -> None:
    pool = make_pool("""\
        import subprocess
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1001)"], start_new_session=True)
        time.sleep(0.2)
        return float(len(open(f"/proc/self/task/{os.getpid()}/children").read().split()))
        """)
    uid = int(pool.grade({}, {"probe": "uid"}).score or 0)
    assert pool.grade({}, {}) == GradeOutcome(2.0)  # both children were running when grade() returned
    assert wait_until(lambda: len(processes_of_uid(uid)) == 1), processes_of_uid(uid)  # the worker alone
    assert_healthy(pool)


def test_the_hosts_loopback_is_unreachable(make_pool: MakePool) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        pool = make_pool("""\
            import socket
            socket.create_connection(("127.0.0.1", item["port"]), timeout=0.5)
            return 1.0
            """)
        # The sandbox's network namespace has a loopback of its own, with nothing listening on it.
        outcome = pool.grade({}, {"port": listener.getsockname()[1]})
        assert_runtime_error(outcome, "grade() raised ConnectionRefusedError")
        with pytest.raises(TimeoutError):
            listener.accept()
    assert_healthy(pool)


def test_unix_sockets_under_run_and_tmp_are_hidden(make_pool: MakePool) -> None:
    paths = [f"/run/rft-test-{uuid.uuid4().hex}.sock", f"/tmp/rft-test-{uuid.uuid4().hex}.sock"]
    listeners = []
    try:
        for path in paths:
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen()
            listeners.append(listener)
        pool = make_pool("""\
            import socket
            socket.socket(socket.AF_UNIX).connect(item["path"])
            return 1.0
            """)
        for path in paths:
            assert_runtime_error(pool.grade({}, {"path": path}), "grade() raised FileNotFoundError")
    finally:
        for listener in listeners:
            listener.close()
        for path in paths:
            Path(path).unlink(missing_ok=True)
    assert_healthy(pool)


def test_grader_sees_only_its_own_processes(make_pool: MakePool) -> None:
    pool = make_pool("""\
        if item.get("path"):
            return float(len(open(item["path"], "rb").read()))
        return float(sum(1 for name in os.listdir("/proc") if name.isdigit()))
        """)
    assert pool.grade({}, {}) == GradeOutcome(2.0)  # bwrap's init and itself: a PID namespace of its own
    for pid in (os.getpid(), os.getppid()):  # the service's processes do not exist there
        assert_runtime_error(pool.grade({}, {"path": f"/proc/{pid}/environ"}), "grade() raised FileNotFoundError")
    assert_healthy(pool)


def test_parent_environment_is_not_inherited(make_pool: MakePool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_SECRET_KEY", "topsecret")
    pool = make_pool("""\
        raw = open("/proc/self/environ", "rb").read()
        raise RuntimeError(",".join(sorted(os.environ)) + (" LEAK" if b"topsecret" in raw else ""))
        """)
    outcome = pool.grade({}, {})
    names = "HOME,LANG,MKL_NUM_THREADS,NUMEXPR_NUM_THREADS,OMP_NUM_THREADS,OPENBLAS_NUM_THREADS,PATH,TMPDIR"
    assert_runtime_error(outcome, f"RuntimeError: {names} (line")
    assert "RFT_SECRET_KEY" not in (outcome.error or "") and "LEAK" not in (outcome.error or "")
    assert_healthy(pool)


def test_host_folders_are_not_there_at_all(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool("return float(len(open(item['path']).read()))\n")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as shared:
        os.chmod(shared, 0o755)  # readable by anyone on the host: the sandbox's root simply has no /var
        (Path(shared) / "secret.txt").write_text("topsecret")
        os.chmod(Path(shared) / "secret.txt", 0o644)
        assert_runtime_error(pool.grade({}, {"path": f"{shared}/secret.txt"}), "grade() raised FileNotFoundError")
    (tmp_path / "secret.txt").write_text("topsecret")
    assert_runtime_error(pool.grade({}, {"path": str(tmp_path / "secret.txt")}), "raised FileNotFoundError")
    assert_healthy(pool)


def test_oversized_file_write_raises_instead_of_killing(make_pool: MakePool) -> None:
    pool = make_pool(
        """\
        chunk = b"\\0" * 2**20
        with open("big.bin", "wb") as f:
            for _ in range(1024):
                f.write(chunk)
        return 1.0
        """,
        timeout_s=10.0,
    )
    assert_runtime_error(pool.grade({}, {}), "grade() raised OSError: [Errno 27] File too large")
    assert_healthy(pool)


def test_printing_a_gigabyte_never_reaches_the_protocol(make_pool: MakePool) -> None:
    pool = make_pool(
        """\
        text, raw = "x" * 2**20, b"y" * 2**20
        for _ in range(400):
            print(text)
            os.write(1, raw)
            os.write(2, raw)
            sys.stderr.write(text)
        return 0.25
        """,
        timeout_s=10.0,
    )
    outcome = pool.grade({}, {})
    assert outcome == GradeOutcome(0.25) or "timed out" in (outcome.error or ""), outcome
    assert_healthy(pool)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("float('nan')", "grade() returned NaN; return a finite float"),
        ("float('inf')", "grade() returned inf; return a finite float"),
        ("'0.9'", "grade() returned a str ('0.9'); return a finite float"),
        ("None", "grade() returned None (is a `return` missing?)"),
        ("True", "grade() returned a bool (True); return a number such as 1.0 or 0.0"),
        ("type('Liar', (), {'__float__': lambda self: 1.0})()", "grade() returned a Liar; return a finite float"),
        (
            "type('LyingFloat', (float,), {'__float__': lambda self: 1.0})(0.1)",
            "grade() returned a LyingFloat (a float subclass, whose __float__ is not trusted)",
        ),
    ],
    ids=["nan", "inf", "str", "none", "bool", "lying_float_method", "lying_float_subclass"],
)
def test_non_float_return_is_a_clear_runtime_error(make_pool: MakePool, expression: str, message: str) -> None:
    pool = make_pool(f"return {expression}\n")
    assert_runtime_error(pool.grade({}, {}), message)
    assert_healthy(pool)


@pytest.mark.parametrize(
    "payload",
    [
        "b'garbage!' * 1000",  # a length prefix far over the frame limit
        "len(b'{\"score\": NaN}').to_bytes(4, 'big') + b'{\"score\": NaN}'",  # not strict JSON
        "len(b'[1]').to_bytes(4, 'big') + b'[1]'",  # JSON, but not a result
    ],
    ids=["garbage", "nan_json", "wrong_shape"],
)
def test_writing_to_the_protocol_fd_is_a_runtime_error(make_pool: MakePool, payload: str) -> None:
    pool = make_pool(f"""\
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2:
                try:
                    os.write(fd, {payload})
                except OSError:
                    pass
        return 1.0
        """)
    assert_runtime_error(pool.grade({}, {}), "grade() broke the sandbox protocol")
    assert_healthy(pool)


def test_grade_many_returns_outcomes_in_call_order(make_pool: MakePool) -> None:
    pool = make_pool(
        """\
        if item["i"] % 7 == 0:
            raise ValueError(item["i"])
        return item["i"] / 1000
        """,
        size=4,
        timeout_s=10.0,
    )
    outcomes = pool.grade_many([({"output_text": ""}, {"i": i}) for i in range(200)])
    assert len(outcomes) == 200
    for i, outcome in enumerate(outcomes):
        if i % 7 == 0:
            assert_runtime_error(outcome, f"grade() raised ValueError: {i} (line")
        else:
            assert outcome == GradeOutcome(i / 1000)


def test_sandbox_that_cannot_start_is_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [sys.executable, "-c", "import sys; sys.stderr.write('no sandbox today'); sys.exit(3)"]
    monkeypatch.setattr(Isolation, "command", lambda self, tmp_bytes, seccomp_fd: broken)
    with PythonGraderPool(grader("return 1.0\n"), size=2) as pool:
        outcomes = pool.grade_many([({}, {})] * 5)
    assert {o.error_type for o in outcomes} == {"python_grader_server_error"}
    assert "could not start" in (outcomes[0].error or "") and "exited with status 3" in (outcomes[0].error or "")
    assert "no sandbox today" in (outcomes[0].error or "")


def test_close_leaves_no_sandbox_process_behind(make_pool: MakePool) -> None:
    pool = make_pool("time.sleep(0.2)\nreturn 1.0\n", size=2)
    ids = pool.grade_many([({}, {"probe": probe}) for probe in ("uid", "uid", "ok", "ok")])
    assert pool.grade_many([({}, {}), ({}, {})]) == [GradeOutcome(1.0)] * 2
    pids = pool.sandbox_pids()
    assert len(pids) == 6  # two bwrap launchers, each with its init and a worker under it
    pool.close()
    pool.close()  # idempotent
    # SIGKILLed, a process still takes its moment to exit on a loaded machine; one close missed lives on.
    deadline = time.monotonic() + 5
    while [pid for pid in pids if is_alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if is_alive(pid)]
    if os.geteuid() == 0:
        assert processes_of_uid(int(ids[0].score or 0)) == {}
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade({}, {})


@root_only
def test_sandbox_mounts_never_reach_the_host(make_pool: MakePool) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    pool = make_pool("return float(len(set(os.listdir('/tmp')) - set(item['on_the_way'])))\n")
    on_the_way = sorted(tmp_entries(get_settings()))  # the way to the grader venv, in a checkout under /tmp
    assert pool.grade({}, {"on_the_way": on_the_way}) == GradeOutcome(0.0)  # an empty /tmp of its own
    assert Path("/proc/self/mountinfo").read_text() == before


def test_sandboxes_die_with_the_process_that_owns_the_pool(tmp_path: Path) -> None:
    script = """\
import os, threading, time
from service.graders.sandbox import PythonGraderPool, SandboxLimits
source = "import os, time\\ndef grade(sample, item):\\n    time.sleep(item['s'])\\n    return float(os.getpid())\\n"
pool = PythonGraderPool(source, size=1, limits=SandboxLimits(timeout_s=300))
pool.grade({}, {"s": 0})
print(" ".join(map(str, pool.sandbox_pids())), flush=True)
threading.Thread(target=pool.grade, args=({}, {"s": 100}), daemon=True).start()
time.sleep(0.5)
os._exit(0)  # no close(), no atexit: as if the service were killed mid-call
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    sandbox = [int(pid) for pid in done.stdout.split()]
    assert len(sandbox) == 3  # the launcher, its init and the worker
    assert wait_until(lambda: not any(map(is_alive, sandbox))), f"sandbox {sandbox} outlived its parent"


def is_alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return False


def test_grader_environment_under_the_hosts_tmp_is_not_hidden_by_the_private_tmp(tmp_path: Path) -> None:
    """A checkout in /tmp (a CI runner's, a `mktemp -d` clone) keeps its grader venv there: the sandbox's
    own /tmp must not cover it."""
    venv = Path(tempfile.mkdtemp(dir="/tmp")) / "grader-venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        settings = Settings(env="dev", data_dir=tmp_path / "data", grader_python=venv / "bin" / "python")
        with PythonGraderPool(grader("return 1.0\n"), size=1, isolation=isolation_for(settings)) as pool:
            assert pool.grade({}, {}) == GradeOutcome(1.0)
    finally:
        shutil.rmtree(venv.parent, ignore_errors=True)
