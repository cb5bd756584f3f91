# Two commands for a fresh machine:  `make run`  (set up + the main job)  and  `make test`.
# Set-up is idempotent: each step leaves a stamp and is skipped when its inputs did not change.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
# torch is installed first and pinned, so nothing later can swap in a multi-GB CUDA build.
CONSTRAINTS := constraints.txt

.PHONY: setup run demo chat test lint clean-venv browser llama-server

setup: .stamp-venv .stamp-emulator

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The machine decides the build: with an NVIDIA GPU (nvidia-smi lists one) torch is PyPI's CUDA
# build, bitsandbytes comes in (QLoRA) and llama.cpp is compiled with CUDA where the CUDA compiler
# (nvcc) is found, so n_gpu_layers offloads — without nvcc, or if that build fails, it is built for
# the CPU with a message saying so (training still uses the GPU; /status says where the model runs).
# Without a GPU, torch comes from PyTorch's CPU wheel index (no multi-GB CUDA wheels), falling back
# to the package index's own sources when that index cannot be reached.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda)
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
LLAMA_CPP := llama-cpp-python==0.3.36

.stamp-venv: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(GPU),cuda)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
ifneq ($(NVCC),)
	@echo "set-up: building llama.cpp with CUDA ($(NVCC)); several minutes"
	PATH="$(dir $(NVCC)):$$PATH" CMAKE_ARGS="-DGGML_CUDA=on" $(BIN)/python -m pip install -q --no-cache-dir \
	  -c $(CONSTRAINTS) $(LLAMA_CPP) \
	  || { echo "set-up: the CUDA build of llama.cpp failed (above); building it for the CPU instead: replies are" \
	            "written on the CPU and n_gpu_layers is ignored (training still uses the GPU)"; \
	       $(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(LLAMA_CPP); }
else
	@echo "set-up: an NVIDIA GPU but no CUDA compiler (nvcc): llama.cpp is built for the CPU, so replies are" \
	      "written on the CPU and n_gpu_layers is ignored (training still uses the GPU). Install the CUDA" \
	      "toolkit and run 'make clean-venv setup' to serve from the GPU too."
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(LLAMA_CPP)
endif
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[cuda,dev]'
else
	$(BIN)/python -m pip install -q --timeout 15 --retries 0 --index-url $(TORCH_CPU_INDEX) -c $(CONSTRAINTS) torch==2.13.0 \
	  || $(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
endif
	@touch $@

.stamp-emulator: emulator/package.json emulator/package-lock.json
	cd emulator && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The main job on its embedded default. With TELEGRAM_BOT_TOKEN set it serves Telegram (and
# learns on its schedule); without one it runs the narrated demo of the whole loop against a
# local Telegram emulator (nothing to configure).
run: setup
	@if [ -n "$$TELEGRAM_BOT_TOKEN" ]; then $(BIN)/ouro serve; else $(BIN)/ouro demo; fi

demo: setup
	$(BIN)/ouro demo

chat: setup
	$(BIN)/ouro chat

# Debian's chromium for tests/test_web.py, installed when missing (instant when present).
browser:
	.ci/chromium

# llama.cpp's own llama-server, from the source llama-cpp-python vendors (tests/test_llama_server_engine.py):
# built once per llama-cpp-python version into ~/.cache/ouroboros/ (CI caches that folder by the version).
llama-server: setup
	$(BIN)/python -m tests.helpers.llama_server

test: setup browser llama-server
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV) .stamp-venv .stamp-emulator
