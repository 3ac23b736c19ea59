# make demo  - run the quickstart notebook on 2 local ranks and print the collective result
# make test  - run the whole suite (installs what it needs: .venv from PyPI, Debian packages)
# make check - lint, types and the tests that start no cluster (the edit loop, under 30 s)
# make bench - measure against raw ipyparallel / bare mpirun / mlx.launch; writes bench/results.*
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check bench lint system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies (PyPI) once per pyproject change. The package itself is an editable install, so
# engines and tests always run the checkout; the kernel spec (which a regular `pip install`
# places through data-files) is installed into the venv explicitly.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q '.[test,lm]'
	rm -rf build
	touch $@

$(VENV)/.installed: pyproject.toml $(wildcard jupyter-config/kernels/mlx-cluster/*) $(VENV)/.deps
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m jupyter kernelspec install --sys-prefix --name mlx-cluster jupyter-config/kernels/mlx-cluster >/dev/null
	rm -rf build
	touch $@

system-deps:
	@bash .ci/system-deps.sh

demo: $(VENV)/.installed
	$(PY) notebooks/run.py notebooks/01-quickstart.ipynb

test: lint system-deps
	$(PY) -m pytest -q -rs

check: lint
	$(PY) -m pytest -q -m "not cluster and not kernel"

bench: $(VENV)/.installed system-deps
	$(PY) bench/run.py

lint: $(VENV)/.installed
	$(PY) -m ruff check mlx_cluster_magic tests bench notebooks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info tests/artifacts
