# Every target sets up its own .venv, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the dependencies change.
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

# test-python: another interpreter, by version (PY=3.10, found under pyenv) or by path (PYTHON=/path/to/python).
PY ?=
# Extra pytest arguments for test-python and test-uvloop, e.g. PYTEST_ARGS='-x tests/s3/test_multipart.py'.
PYTEST_ARGS ?=

.PHONY: demo test test-python test-uvloop lint bench bench-report docs clean

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

# One venv per minor version, .venv-3.10 ..., with what the tests need only; its interpreter is OTHER_PYTHON.
# PRECIOUS: make would otherwise delete these pattern-made files as intermediate.
.PRECIOUS: .venv-%/bin/python .venv-%/.installed-test
.venv-%/bin/python:
	$(OTHER_PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip

.venv-%/.installed-test: pyproject.toml | .venv-%/bin/python
	.venv-$*/bin/python -m pip install --quiet -e '.[demo,test]'
	touch $@

test-python:
	@set -e; \
	if [ -n "$(PY)" ]; then python="$$(.ci/find-python '$(PY)')"; \
	elif [ "$(origin PYTHON)" = "command line" ] || [ "$(origin PYTHON)" = "environment" ]; then python='$(PYTHON)'; \
	else echo "make test-python: say which Python: PY=3.10 (found under pyenv) or PYTHON=/path/to/python" >&2; exit 2; fi; \
	version="$$("$$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
		|| { echo "make test-python: $$python does not run" >&2; exit 1; }; \
	echo "make test-python: $$python (Python $$version) in .venv-$$version"; \
	$(MAKE) --no-print-directory .venv-$$version/.installed-test OTHER_PYTHON="$$python"; \
	.venv-$$version/bin/python -m pytest $(PYTEST_ARGS)

# The async tests again on uvloop, the loop uvicorn and many services run; the others never start a test loop.
test-uvloop: $(DEV_STAMP)
	$(BIN)/python -m pytest -m anyio --event-loop=uvloop $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m benchmarks

bench-report: $(DEV_STAMP)
	$(BIN)/python -m benchmarks --peers

docs: $(DEV_STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .venv-*/ build dist docs/_build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
