"""`bench/gpu_check.sh --cpu`: the GPU proof's steps at toy sizes, so the script a lent GPU machine
runs in one call cannot rot unseen between the sessions that get one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_runs_every_step_on_cpu() -> None:
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"],
        capture_output=True,
        text=True,
        timeout=240,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cuda_tests = len(re.findall(r"^def test_", (ROOT / "tests" / "test_cuda.py").read_text(), re.M))
    assert f"{cuda_tests} skipped" in run.stdout  # every CUDA test is collected, and skips saying why
    assert run.stdout.count("tokens/s") == 2 and "== done" in run.stdout
