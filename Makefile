# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint services-up services-down deploy clean-state

install: $(VENV)/.installed

# torch is pinned and installed first so pip takes the local CPU wheel, not a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	infra/local/demo

test: install
	$(PY) -m pytest -ra --timeout=900 --durations=25 $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -ra -m "not e2e and not slow" $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

services-up: install
	infra/local/up

services-down:
	infra/local/down

deploy: install
	infra/local/deploy
