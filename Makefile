# Every target sets up its own .venv, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per extra set, so adding an extra re-runs pip only for what changed.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(subst -,$(comma),$*)]'
	touch $@

comma := ,

demo: $(VENV)/.installed-demo
	$(BIN)/model-runner-sink demo

test: $(VENV)/.installed-test-lint
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory lint

lint: $(VENV)/.installed-lint
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
