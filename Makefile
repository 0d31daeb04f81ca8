# The two commands of the README's quick start. Everything installs into .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUDGET ?= 0.5
DEMO_DIR ?= out/demo

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first: a bare `torch` requirement would pull a newer build with gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[demo,test,ray]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lrdeploy demo --rank-budget $(BUDGET) -o $(DEMO_DIR)

# Two pytest workers (pytest-xdist): the builds in the tests are mostly single-threaded Python.
test: install
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) out
