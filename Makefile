# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint clean-data

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) main.py

test: $(VENV)/.test
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.test  # the unit tests only: no training run, no subprocess (under a minute)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-data:
	rm -rf data/synthetic/images data/synthetic/*.npy data/synthetic/*.pt data/synthetic/synthetic.json
