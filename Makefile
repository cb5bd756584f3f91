# Two commands for a fresh machine:  `make run`  (set up + the main job)  and  `make test`.
# Set-up is idempotent: each step leaves a stamp and is skipped when its inputs did not change.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
# torch is installed first and pinned, so nothing later can swap in a multi-GB CUDA build.
CONSTRAINTS := constraints.txt

.PHONY: setup run demo chat test lint clean-venv

setup: .stamp-venv .stamp-emulator

$(BIN)/python:
	$(PY) -m venv $(VENV)

.stamp-venv: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
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

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV) .stamp-venv .stamp-emulator
