# VENV can point outside the clone (CI reuses one environment across runs).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install install-test demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install -e .

install-test: $(PY)
	$(PY) -m pip install -e '.[test]'

demo: install
	$(VENV)/bin/transferlab demo

test: install-test
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf build dist src/*.egg-info .pytest_cache
