# make demo  - run the quickstart notebook on 2 local ranks and print the collective result
# make test  - run the whole suite (installs what it needs: .venv from PyPI, Debian packages)
# make bench - measure against raw ipyparallel / bare mpirun / mlx.launch; writes bench/results.*
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml $(shell find mlx_cluster_magic jupyter-config -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: demo test bench lint system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies (PyPI) once per pyproject change; the package itself whenever its files change.
# A regular (non-editable) install, so the Jupyter kernel spec lands in the venv.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q '.[test]'
	touch $@

$(VENV)/.installed: $(SOURCES) $(VENV)/.deps
	$(PY) -m pip install -q --no-deps --force-reinstall .
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
