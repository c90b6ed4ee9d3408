# model-deployer: `make demo` deploys the demo model onto the sandbox host; `make test` runs
# every test (unit, server, and the sandbox tier against a real systemd+sshd host and S3).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install test test-fast chaos lint demo
help:
	@echo "make demo          sandbox up, demo model uploaded and deployed, one completion shown"
	@echo "make test          all tests (boots the sandbox host when it is not up)"
	@echo "make test-fast     unit and server tests only (no sandbox)"
	@echo "make chaos         the long fault/load matrix (docs/reliability.md)"
	@echo "make sandbox       boot the sandbox host and S3 endpoint; make sandbox-down stops them"
	@echo "make lint          ruff"

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install-dev.sh
	scripts/install-dev.sh

-include mk/sandbox.mk

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -m "not chaos"

chaos: install
	$(PY) -m pytest -m chaos

test-fast: install
	$(PY) -m pytest -m "not sandbox and not chaos"

demo: install
	scripts/demo.sh
