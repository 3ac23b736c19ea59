# make demo  - run the quickstart notebook on 2 local ranks and print the collective result
# make test  - run the whole suite (installs what it needs: .venv from PyPI, Debian packages)
# make bench - measure against raw ipyparallel / bare mpirun / mlx.launch; writes bench/results.*
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench lint system-deps clean

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

$(VENV)/.installed: pyproject.toml $(VENV)/.deps
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m jupyter kernelspec install --sys-prefix --name mlx-cluster jupyter-config/kernels/mlx-cluster >/dev/null
	rm -rf build
	touch $@

system-deps:
	@bash .ci/system-deps.sh

demo: $(VENV)/.installed
	$(PY) notebooks/run.py notebooks/01-quickstart.ipynb

test: $(VENV)/.installed system-deps
	$(PY) -m ruff check mlx_cluster_magic tests bench notebooks
	$(PY) -m pytest -q -rs

bench: $(VENV)/.installed system-deps
	$(PY) bench/run.py

lint: $(VENV)/.installed
	$(PY) -m ruff check mlx_cluster_magic tests bench notebooks

clean:
	rm -rf $(VENV) build *.egg-info tests/artifacts
