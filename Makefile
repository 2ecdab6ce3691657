# Every target sets up its own .venv, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the dependencies change.
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench bench-report docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo,test,lint,bench,docs]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/model-runner-sink demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs

lint: $(DEV_STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m benchmarks

bench-report: $(DEV_STAMP)
	$(BIN)/python -m benchmarks.peers

docs: $(DEV_STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist docs/_build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
