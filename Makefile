# model-deployer: `make demo` deploys the demo model onto the sandbox host; `make test` runs
# every test (unit, server, and the sandbox tier against a real systemd+sshd host and S3).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install test test-fast test-latest chaos lint lock demo
help:
	@echo "make demo          sandbox up, demo model uploaded and deployed, one completion shown"
	@echo "make test          all tests (boots the sandbox host when it is not up)"
	@echo "make test-fast     unit and server tests only (no sandbox)"
	@echo "make chaos         the long fault/load matrix (docs/reliability.md)"
	@echo "make sandbox       boot the sandbox host and S3 endpoint; make sandbox-down stops them"
	@echo "make lint          lock check, ruff, mypy (strict, pyproject.toml)"
	@echo "make lock          resolve pyproject.toml again into deployer/locks/ (on purpose only)"
	@echo "make test-latest   the fast tier on the newest versions the ranges allow (throwaway venv)"

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml deployer/locks/dev.txt scripts/install-dev.sh
	scripts/install-dev.sh

-include mk/sandbox.mk

lint: install
	@$(PY) scripts/lock.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Refresh the lock on purpose: every version may move. Commit the result with the reason.
#   make lock                  keeps every locked version the ranges still allow
#   make lock UPGRADE=pkg      moves pkg (several: UPGRADE="a b"; everything: UPGRADE=all)
lock: install
	$(PY) scripts/lock.py $(foreach p,$(UPGRADE),--upgrade $(p))

# What is coming: the newest releases the ranges in pyproject.toml allow, in a throwaway venv,
# against the fast tier. Not part of `make test`; red here means a bound or a fix is due.
test-latest:
	scripts/test-latest.sh

test: install lint
	$(PY) -m pytest -m "not chaos" --durations=25

chaos: install
	$(PY) -m pytest -m chaos

test-fast: install
	$(PY) -m pytest -m "not sandbox and not chaos"

demo: install
	scripts/demo.sh
