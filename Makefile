# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use (torch pinned to the CPU build).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,edge,analysis]'
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: install demo test test-slow lint config
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedpa demo

# the lint, then the fast suite (slow tests: make test-slow)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# rewrite what derives from common/config.py: pyproject.toml's [tool.flwr.app.config] and docs/configuration.md
config: $(STAMP)
	$(VENV)/bin/python -m fedpa.common.config --write
