# ml_prod developer commands. `make demo` and `make test` are the README's quick start;
# `.ci/run` (what CI runs) is `make venv check test`.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# notebooks nbdev-clean keeps tidy: the nbdev sources and the job notebooks the package ships
EXAMPLES := ml_prod/examples
SHIPPED := ml_prod/notebooks

# SKIP_SLOW=1 leaves out `#| slow` notebook cells and pytest's `slow` scenarios; LONG=1 adds the `long` ones,
# which CI (`make test`) leaves out to stay inside its time limit
ifeq ($(SKIP_SLOW),1)
NBDEV_TEST_FLAGS :=
PYTEST_ARGS      := -m "not slow and not long"
else ifeq ($(LONG),1)
NBDEV_TEST_FLAGS := --flags slow
PYTEST_ARGS      :=
else
NBDEV_TEST_FLAGS := --flags slow
PYTEST_ARGS      := -m "not long"
endif
# pytest's parallel workers (pytest-xdist; tests/conftest.py says which tests run where, and which alone); 0: one process
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv export normalize clean readme check test demo tutorial docs bench

help:
	@echo "make demo     set up .venv and run the fraud example as tracked jobs on a local Ray (ml_prod demo)"
	@echo "make test     set up .venv and run all tests: nbdev-test on nbs/, then pytest tests (SKIP_SLOW=1: skip slow ones; LONG=1: add the long scenarios; TEST_WORKERS=N: pytest workers, default 2)"
	@echo "make venv     create .venv and install ml_prod with every extra: lab, example, dev (re-runs only when pyproject.toml changes)"
	@echo "make export   write ml_prod/ from the notebooks in nbs/"
	@echo "make normalize  nbdev-clean the notebooks in nbs/, $(EXAMPLES)/ and $(SHIPPED)/ (metadata, execution counts; outputs kept)"
	@echo "make clean    remove build outputs (docs site, wheels, caches); sources and .ml_prod/ are left alone"
	@echo "make readme   render README.md from nbs/index.ipynb"
	@echo "make tutorial run ml_prod demo in a fresh project and save the executed tutorial with its outputs"
	@echo "make check    fail if export, normalize or readme would change anything"
	@echo "make docs     build the docs site into docs/site/ with Sphinx + myst-nb (offline; any warning fails it; ml_prod docs build runs the same docs/build.py)"
	@echo "make bench    run every benchmark script bench/*.py"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[lab,example,dev]"
	@touch $@

export: venv
	$(BIN)/nbdev-export

normalize: venv
	$(BIN)/nbdev-clean --fname nbs
	$(BIN)/nbdev-clean --fname $(EXAMPLES)
	$(BIN)/nbdev-clean --fname $(SHIPPED)

clean:
	rm -rf docs/site docs/_build _docs _proc build dist *.egg-info .pytest_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

readme: venv
	$(PY) .ci/readme.py

# runs export and normalize on a throwaway copy and compares: never writes to the working tree
check: venv
	.ci/check

test: venv
	$(PY) .ci/nbtest.py $(NBDEV_TEST_FLAGS)
	@$(PY) .ci/cells.py $(NBDEV_TEST_FLAGS)
	$(PY) -m pytest tests $(PYTEST_ARGS) -n $(TEST_WORKERS) --durations=20

demo: venv
	$(BIN)/ml_prod demo

tutorial: venv
	$(PY) .ci/tutorial.py

docs: venv
	$(PY) docs/build.py

bench: venv
	@set -e; found=0; for f in bench/[!_]*.py; do [ -e "$$f" ] || continue; found=1; \
	  echo "== $$f"; $(PY) "$$f"; done; [ $$found = 1 ] || echo "no benchmarks (bench/*.py) yet"
