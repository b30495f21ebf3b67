# isplit — developer entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.isplit-installed
RUN_DIR ?= var

.PHONY: setup system-deps test test-cluster cluster-up cluster-down cluster-status lint fmt demo up down status bench clean-venv

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

# Debian packages: the Fashion-MNIST IDX files, Prometheus (promtool, local scraping) and the
# PostgreSQL server (the tests run the job store on it too).
system-deps:
	@scripts/system-deps

test: setup
	$(PY) -m pytest -q tests

# The product on a real one-node Kubernetes (scripts/cluster): builds the images, `skaffold run
# -p local`, runs the pipeline against the cluster, tears it down (ISPLIT_KEEP_CLUSTER=1 keeps it).
test-cluster: setup
	ISPLIT_CLUSTER_TESTS=1 $(PY) -m pytest -q tests/cluster

# The one-machine cluster by hand: `make cluster-up`, then `eval "$$(scripts/cluster env)"`.
cluster-up: setup
	scripts/cluster up

cluster-down:
	scripts/cluster down

cluster-status:
	scripts/cluster status

# The local stack: Kafka, analyzer :8000, trainer :9101, TorchServe :8080-8082, Prometheus :9090.
up: setup
	$(VENV)/bin/isplit stack up

down:
	@if [ -x $(VENV)/bin/isplit ]; then $(VENV)/bin/isplit stack down; fi

status:
	$(VENV)/bin/isplit stack status

# The main job: the product end to end (brings the stack up if it is down).
demo: setup
	$(VENV)/bin/isplit demo

bench: setup
	$(PY) benchmarks/bench_importance.py --arch vgg16 --input-size 64 --device cpu
	$(PY) benchmarks/bench_serving.py

lint: $(STAMP)
	$(VENV)/bin/ruff check shared services tests benchmarks scripts
	$(VENV)/bin/ruff format --check shared services tests benchmarks

fmt: $(STAMP)
	$(VENV)/bin/ruff format shared services tests benchmarks
	$(VENV)/bin/ruff check --fix shared services tests benchmarks

clean-venv:
	rm -rf $(VENV)
