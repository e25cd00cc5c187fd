# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and these commands.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test test-fast test-slow lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel here; a bare 'torch' requirement would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/zps run --servers 2 --workers 2 --mode bsp examples/digits.py --epochs 20

# the suite CI runs: unit and cluster (real sockets and processes on loopback), two tests at a time; about 8 minutes on 2 cores
test: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

# the slow tier, two tests at a time: accuracy over several seeds, 100k fuzzed messages per role, every DDP
# conformance idiom on every cluster shape and resumed, deterministic BSP on every shape (about 25 minutes on 2 cores)
test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

# the unit tier alone: one process, no cluster (well under a minute)
test-fast: setup
	$(PY) -m pytest -q -m unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
