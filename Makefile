# isplit — developer entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.isplit-installed
RUN_DIR ?= var

.PHONY: setup test lint fmt demo up down status bench clean-venv

setup: $(STAMP) system-deps
	@scripts/kafka fetch
	@if [ -x scripts/k8s-tools ]; then scripts/k8s-tools fetch; fi

# Python: one venv for the whole project; reinstalled only when a dependency list changes.
$(STAMP): requirements.txt shared/pyproject.toml services/analyzer/pyproject.toml services/trainer/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --config-settings editable_mode=compat -e shared -e services/analyzer -e services/trainer
	@touch $(STAMP)

# Debian packages: the Fashion-MNIST IDX files and Prometheus (promtool, local scraping).
system-deps:
	@scripts/system-deps

test: setup
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check shared services tests benchmarks scripts
	$(VENV)/bin/ruff format --check shared services tests benchmarks

fmt: $(STAMP)
	$(VENV)/bin/ruff format shared services tests benchmarks
	$(VENV)/bin/ruff check --fix shared services tests benchmarks

clean-venv:
	rm -rf $(VENV)
