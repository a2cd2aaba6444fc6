# `make train` and `make test` create .venv on first use (plain pip: it takes torch from the
# wheels on this machine's disk instead of downloading a CUDA build), then run.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/orchestrator train configs/digits.yaml --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check orchestrator workers tests bench
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator workers tests bench

clean:
	rm -rf runs .pytest_cache
