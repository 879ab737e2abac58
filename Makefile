# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv and installs the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast system-deps clean-venv

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vampnet-pl demo $(ARGS)

system-deps:
	bash scripts/system_deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)
