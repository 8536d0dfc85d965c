# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv with
# dmgrd installed as a user would install it) and then run. The install is redone when sources change.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.dmgrd-installed
SOURCES := pyproject.toml setup.py $(shell find dmgrd kernels csrc -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: demo test bench lint

$(INSTALLED): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install '.[test,lint]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/dmgrd demo

# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors; set TRITON_INTERPRET=0 on a GPU machine.
test: $(INSTALLED)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/pytest tests

bench: $(INSTALLED)
	$(BIN)/pytest benchmarks --benchmark-only

# ruff (style, imports, likely bugs), mypy (types of dmgrd/), import-linter (layers import downwards, no cycles;
# [tool.importlinter] in pyproject.toml), all on the source tree.
lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/mypy
	PYTHONPATH=. $(BIN)/lint-imports
