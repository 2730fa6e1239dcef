# The two commands of the README. Each creates/updates the virtualenv in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: search test test-fast bench install

install: $(VENV)/.installed

# torch is installed first and alone, pinned by constraints.txt: an unpinned torch pulls several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

search: install
	$(PY) tune/search.py

test: install
	$(PY) -m pytest

# For development: the unit tests of pure code (no Ray cluster, S3 server, browser or long training), under 2 minutes.
test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow"

bench: install
	$(PY) bench/bench_core.py
