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


def test_the_wheels_for_an_offline_gpu_machine_cover_the_service_and_leave_its_torch_alone() -> None:
    """`bench/gpu_wheels.py` chooses what travels to the lent machine (which reaches no index) from
    what rft's code really imports: the service stack its image lacks must be among them, and
    nothing that would shadow the image's CUDA torch or its libraries."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_wheels

    needed = gpu_wheels.with_requirements(gpu_wheels.imported_distributions())
    carried = {n for n in needed if not gpu_wheels.IMAGE_KEEPS.match(n) and n not in gpu_wheels.IMAGE_HAS}
    assert {"pydantic", "pydantic-core", "fastapi", "sqlalchemy", "alembic", "celery", "psycopg-binary"} <= carried
    assert {"transformers", "tokenizers", "peft", "llguidance"} <= carried  # as tested here, not the image's
    assert not {n for n in carried if n == "torch" or n.startswith("nvidia-") or n in ("numpy", "triton")}
    assert "rft" not in carried  # the repository itself travels
