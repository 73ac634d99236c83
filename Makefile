# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use (torch pinned to the CPU build).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,edge]'
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: install demo test test-slow bench
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedpa demo

test: $(STAMP)
	$(VENV)/bin/pytest

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow
