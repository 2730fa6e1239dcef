# The two commands of the README. Each creates/updates the virtualenv in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: search test test-fast bench install browser

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

test: install browser
	$(PY) -m pytest --durations=25

# The report's browser tests drive headless Chromium: installed here, by the set-up step, never by a test. Without
# root or apt-get it says what is missing, and those tests then fail naming it.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "make: headless Chromium is missing and cannot be installed here (needs root and apt-get:" \
	  "apt-get install chromium chromium-driver); the browser tests will fail naming it" >&2; fi

# For development: the unit tests of pure code (no Ray cluster, S3 server, browser or long training), under 2 minutes.
# It runs in the environment already set up: .venv, else a `python` on PATH that imports this checkout's diffmic
# (an activated virtualenv); only when there is neither is .venv created first.
test-fast:
	@if [ -x $(PY) ]; then py=$(PY); \
	elif python -c "import diffmic, torch, pathlib, sys; sys.exit(pathlib.Path(diffmic.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null; then py=python; \
	else $(MAKE) install && py=$(PY); fi; \
	$$py -m pytest -q -m "not integration and not slow"

bench: install
	$(PY) bench/bench_core.py
