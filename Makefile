# Smart-Diffusion: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test lint unit tools venv cluster-up cluster-down clean

# Install the pinned Python environment (torch, diffusers, kopf, ...) once per pyproject.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e ".[runtime,operator,dev]"
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Build (or find in ~/.cache/smart-diffusion) the pinned control-plane and S3 binaries.
tools:
	hack/tools.sh build

# The main job on its embedded default: a real cluster + S3 on loopback, a video generated.
demo: venv tools
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) hack/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy --strict runtime/smartdiff/api operator/smartdiff_operator
	$(VENV)/bin/mypy runtime/smartdiff

# Tests without the cluster run on two workers; those with it (marked by tests/conftest.py)
# in one process, so one control plane + S3 server serves them all.
unit: venv tools
	$(PY) -m pytest -q -n 2 -m "not cluster"
	$(PY) -m pytest -q -m cluster

# Every test: lint, then the whole suite (unit, reference-equivalence, control plane).
test: lint unit

cluster-up: venv tools
	hack/cluster up

cluster-down:
	hack/cluster down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
