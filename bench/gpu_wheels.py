"""The wheels a lent GPU machine needs to run `bench/gpu_check.sh`, into `.whl/` (git-ignored).

    .venv/bin/python bench/gpu_wheels.py        # here, where PyPI is reachable; then carry ".whl"

The GPU machine reaches no package index. Its image has Python 3.12 with CUDA torch, numpy, scipy,
pytest and more (the device tool's KINDS.md), but not rft's service stack (pydantic, FastAPI,
SQLAlchemy, Celery, ...), and older transformers. This takes every distribution rft's code imports
for the CUDA tests and the engine and memory benches, with what each requires, at the versions this
`.venv` runs (the ones the tests here pass with), leaves out what the image holds and must not be
shadowed (torch and its CUDA libraries, numpy, ...), and downloads CPython 3.12 manylinux wheels of
the rest. gpu_check.sh installs them with `pip --no-index --no-deps --target`, ahead of the image's
own packages on PYTHONPATH. The device tool carries at most 64 MiB with the repository, so this
fails above 56 MiB. vLLM's CUDA wheel alone is several hundred MB: it cannot travel, and there
gpu_check.sh measures the torch engine only, saying so.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".whl"
LIMIT_MIB = 56
# What rft's code paths on the GPU machine import: the CUDA tests' (through tests/conftest.py, the
# whole service), the loop's, and the benches'. Their requirements are followed from here.
MODULES = [
    "service.app",
    "service.cli",
    "workers.runner",
    "workers.rl.loop",
    "workers.rl.vllm_engine",
    "workers.rl.follower",
    "tests.conftest",
]
ALSO = ["peft", "accelerate", "llguidance", "tokenizers", "uvicorn", "pytest-timeout"]  # imported lazily
# In the image: CUDA builds and large packages, never carried (a CPU torch over the image's CUDA one
# would be the worst of both), and packages whose versions there do for rft (its pip list, KINDS.md),
# left out to stay under the size limit.
IMAGE_KEEPS = re.compile(r"^(torch|triton|nvidia-.*|numpy|scipy|sympy|mpmath|networkx|pillow|setuptools|pip)$")
IMAGE_HAS = set(
    [
        "anyio",
        "certifi",
        "charset-normalizer",
        "click",
        "filelock",
        "fsspec",
        "h11",
        "hf-xet",
        "httpcore",
        "httpx",
        "idna",
        "iniconfig",
        "jinja2",
        "markdown-it-py",
        "markupsafe",
        "mdurl",
        "pluggy",
        "prometheus-client",
        "protobuf",
        "psutil",
        "pygments",
        "pytest",
        "python-dateutil",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "shellingham",
        "six",
        "sniffio",
        "tqdm",
        "typer",
        "urllib3",
        "xxhash",
    ]
)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]
PLATFORMS += ["manylinux_2_5_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> set[str]:
    sys.path.insert(0, str(ROOT))
    for module in MODULES:
        importlib.import_module(module)
    owners = metadata.packages_distributions()
    found = {canonical(d) for name in list(sys.modules) for d in owners.get(name.split(".")[0], [])}
    return (found - {"rft"}) | {canonical(n) for n in ALSO}  # rft itself travels as the repository


def with_requirements(names: set[str]) -> set[str]:
    """`names` and, recursively, what each requires (extras' requirements left out) as installed here."""
    seen: set[str] = set()
    todo = sorted(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here: not needed here either
        seen.add(name)
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(canonical(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return seen


def main() -> None:
    needed = with_requirements(imported_distributions())
    wanted = sorted(n for n in needed if not IMAGE_KEEPS.match(n) and n not in IMAGE_HAS)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    pins = [f"{name}=={metadata.version(name)}" for name in wanted]
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(OUT)]
    base += ["--python-version", "3.12", "--implementation", "cp", *platforms]
    missing = []
    for pin in pins:
        if subprocess.run([*base, pin], capture_output=True, text=True).returncode != 0:
            missing.append(pin)
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 2**20
    print(f"{len(pins) - len(missing)} wheels, {size:.1f} MiB in {OUT}")
    if missing:
        sys.exit(f"no CPython 3.12 manylinux wheel of: {', '.join(missing)}")
    if size > LIMIT_MIB:
        sys.exit(f"{size:.1f} MiB is over {LIMIT_MIB} MiB: the device tool carries 64 MiB with the repository")


if __name__ == "__main__":
    main()
