# `make train` and `make test` create .venv on first use (plain pip: it takes torch from the
# wheels on this machine's disk instead of downloading a CUDA build), then run.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test test-fast test-gpu lint docs clean test-pythons test-cluster-setup

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/orchestrator train configs/digits.yaml --overwrite

# Two test files at a time (pytest-xdist, a file's tests on one process: its module fixtures,
# such as one local Ray, are shared). Every test finds its own run's processes, never another
# run's, so two Rays side by side are what they would be on a user's machine. TEST_JOBS=0
# runs everything in this process, one test after another. Three at a time was measured
# slower (49 min 59 s against 44 min 29 s, the 2 cores already full): docs/testing.md.
# --no-loadscope-reorder: files go out in tests/conftest.py's order (longest first); xdist's
# default reorders them by their number of tests, which sent the longest files out last.
TEST_JOBS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# The whole suite (what CI runs): the unit, distributed and integration tiers (pyproject's
# testpaths; not tests/gpu).
test: $(STAMP)
	$(VENV)/bin/ruff check orchestrator workers tests bench scripts
	$(VENV)/bin/mypy
	$(PYTEST)

# The edit loop: lint, then the tiers without Ray (no cluster starts). A few minutes on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check orchestrator workers tests bench scripts
	$(VENV)/bin/mypy
	$(PYTEST) tests/unit tests/distributed -q

# One NVIDIA GPU (skipped, with the reason, where there is none): about 8 minutes at most.
# ORCHESTRATOR_TEST_DEVICE=cpu runs the same checks on the CPU.
test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest tests/gpu -v

lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator workers tests bench scripts
	$(VENV)/bin/mypy

# docs/config.md is generated from the config schema; tests/unit/test_docs.py checks it is current.
docs: $(STAMP)
	$(VENV)/bin/python scripts/config_reference.py --out docs/config.md

# Not part of `make test`: each supported Python gets a fresh venv (about 7 GB, minutes to
# install; on Pythons other than 3.11 pip downloads torch), the unit tier and a 2-worker run.
test-pythons:
	$(PYTHON) scripts/test_pythons.py

# cluster.yaml's setup_commands, run here against a fake home whose image has Python 3.10.
test-cluster-setup:
	$(PYTHON) scripts/test_cluster_setup.py

clean:
	rm -rf runs .pytest_cache
