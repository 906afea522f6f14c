# Quick start: `make demo`, then `make test`. `make install` is idempotent and used by both.
PYTHON_VERSION ?= 3.13
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench clean

# Pick a Python 3.13+: pyenv's (honouring .python-version), else python3.13, else python3.
$(PY):
	@set -e; \
	if command -v pyenv >/dev/null 2>&1 && pyenv which python >/dev/null 2>&1; then base=$$(pyenv which python); \
	elif command -v python$(PYTHON_VERSION) >/dev/null 2>&1; then base=python$(PYTHON_VERSION); \
	else base=python3; fi; \
	$$base -c 'import sys; assert sys.version_info >= (3, 13), "Python 3.13+ is required, found " + sys.version' ; \
	$$base -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/lab demo

# The window tests of `lab watch --human` draw on a virtual display (Xvfb, seen through xwininfo).
# Installed here when missing and possible (apt, as root); where not, those tests skip and say why.
XVFB_SETUP = command -v Xvfb >/dev/null 2>&1 && command -v xwininfo >/dev/null 2>&1 || \
	{ { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb x11-utils || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb x11-utils; }; } \
	  >/dev/null 2>&1 || echo "note: could not install Xvfb (apt-get install xvfb x11-utils); the window tests will skip"; }

test: install
	@$(XVFB_SETUP)
	$(PY) -m pytest -q -m "slow or not slow" --durations=15

test-fast: install
	@$(XVFB_SETUP)
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(VENV)/bin/lab bench env
	$(VENV)/bin/lab bench train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
