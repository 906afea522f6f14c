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

test: install
	$(PY) -m pytest -q -m "slow or not slow" --durations=15

test-fast: install
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
