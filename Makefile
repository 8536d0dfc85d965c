# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv with
# dmgrd installed as a user would install it) and then run. The install is redone when sources change.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.dmgrd-installed
SOURCES := pyproject.toml setup.py $(shell find dmgrd kernels csrc -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: demo test test-min bench bench-models gpu-wheels gpu-check lint

$(INSTALLED): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install '.[test,lint]'
	touch $@

# `make test-min`: the same set-up in .venv-min with every dependency at its oldest allowed release
# (.ci/minimum-versions.txt, pyproject's lower bounds). PIP_CONSTRAINT also reaches the build environment that
# compiles dmgrd._C, so the extension is built against that torch too. CPU kernels only unless DMGRD_NO_CUDA=0.
# Several GB of downloads (a CUDA build of torch): run by hand, not by .ci/run.
MIN_VENV ?= .venv-min
MIN_CONSTRAINTS := .ci/minimum-versions.txt
MIN_INSTALLED := $(MIN_VENV)/.dmgrd-installed

$(MIN_INSTALLED): $(SOURCES) $(MIN_CONSTRAINTS)
	$(PYTHON) -m venv $(MIN_VENV)
	PIP_CONSTRAINT=$(CURDIR)/$(MIN_CONSTRAINTS) DMGRD_NO_CUDA=$${DMGRD_NO_CUDA:-1} $(MIN_VENV)/bin/pip install '.[test]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/dmgrd demo

# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors; set TRITON_INTERPRET=0 on a GPU machine.
test: $(INSTALLED)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/pytest tests

test-min: $(MIN_INSTALLED)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(MIN_VENV)/bin/pytest tests

bench: $(INSTALLED)
	mkdir -p .benchmarks
	$(BIN)/pytest benchmarks --benchmark-only --benchmark-json=.benchmarks/all.json
	$(BIN)/python benchmarks/models_table.py .benchmarks/all.json

# End-to-end images/s and training step per method x teacher x preset, with the per-stage table; small sizes
# by default (64x64: ~15 min for all methods on a 2-core CPU), DMGRD_BENCH_FULL=1 for 256x256 and batch-8 training.
bench-models: $(INSTALLED)
	mkdir -p .benchmarks
	$(BIN)/pytest benchmarks/bench_models.py --benchmark-only --benchmark-json=.benchmarks/models.json
	$(BIN)/python benchmarks/models_table.py .benchmarks/models.json

# `make gpu-wheels` (where pip reaches a registry) fills .gpu-wheels/ with the pure-Python dependencies; `make
# gpu-check` (on a CUDA machine with torch and triton installed, no registry needed) installs what is missing
# from there, builds dmgrd, runs the CUDA/Triton tests and the benchmarks and prints one summary (under 8 min).
GPU_WHEELS ?= .gpu-wheels

gpu-wheels:
	$(PYTHON) -m pip download --no-deps -d $(GPU_WHEELS) $$($(PYTHON) benchmarks/gpu_check.py --requirements)

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS)

# ruff (style, imports, likely bugs), mypy (types of dmgrd/), import-linter (layers import downwards, no cycles;
# [tool.importlinter] in pyproject.toml), all on the source tree.
lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/mypy
	PYTHONPATH=. $(BIN)/lint-imports
