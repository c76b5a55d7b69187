# Two commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.bench: $(VENV)/.base
	$(PIP) -e ".[bench]"
	touch $@

demo: $(VENV)/.base
	$(PY) -m deepseek_jax.demo

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest tests

bench: $(VENV)/.bench
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV)
