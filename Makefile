# make demo  - run the quickstart notebook on 2 local ranks and print the collective result
# make test  - run the whole suite (installs what it needs: .venv from PyPI, Debian packages)
# make check - lint, types and the tests that start no cluster (the edit loop, under 30 s)
# make bench - measure against raw ipyparallel / bare mpirun / mlx.launch; writes bench/results.*
# make docs  - the documentation site, offline, warnings as errors: docs/_build/html/index.html
# make notebooks - execute every example notebook on 2 local ranks and store its outputs (the site shows them)
SHELL := /bin/bash
PYTHON ?= python3
# Compiled modules (and pytest's rewritten tests) are cached in __pycache__: a shell that forbids
# writing bytecode would have every run compile the package and the suite again (half of make
# check's start-up).
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check bench lint docs notebooks system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies (PyPI) once per pyproject change. The package itself is an editable install, so
# engines and tests always run the checkout; the kernel spec (which a regular `pip install`
# places through data-files) is installed into the venv explicitly. Every tool runs as a module
# of the venv's python (never `jupyter ...`, which finds its subcommands on PATH, where another
# active environment's come first). The same goes for the front-end extension (data-files too)
# that lets sidecar's side panel open in Jupyter Notebook 7.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q '.[test,lm,docs]'
	rm -rf build
	touch $@

$(VENV)/.installed: pyproject.toml $(wildcard jupyter-config/kernels/mlx-cluster/*) $(wildcard jupyter-config/labextensions/mlx-cluster-magic/* jupyter-config/labextensions/mlx-cluster-magic/static/*) $(VENV)/.deps
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m jupyter_client.kernelspecapp install --sys-prefix --name mlx-cluster jupyter-config/kernels/mlx-cluster >/dev/null
	rm -rf $(VENV)/share/jupyter/labextensions/mlx-cluster-magic
	mkdir -p $(VENV)/share/jupyter/labextensions
	cp -R jupyter-config/labextensions/mlx-cluster-magic $(VENV)/share/jupyter/labextensions/
	rm -rf build
	touch $@

system-deps:
	@bash .ci/system-deps.sh

demo: $(VENV)/.installed
	$(PY) notebooks/run.py notebooks/01-quickstart.ipynb

# Three sessions side by side: the tests that build virtual hosts (fixed names, so one at a time
# per fixture), the network-drop tests (virtual hosts of their own; they mostly wait out drops),
# and every other test. Much of each waits on processes and networks rather than the CPU.
# Nothing of theirs goes into .venv: setup's tests copy it to the virtual hosts.
test: lint system-deps docs
	@log=$$(mktemp); drops=$$(mktemp); \
	$(PY) -m pytest -q -rs -m "vhosts and not drops" -p no:cacheprovider > $$log 2>&1 & hosts=$$!; \
	$(PY) -m pytest -q -rs -m "drops" -p no:cacheprovider > $$drops 2>&1 & dropping=$$!; \
	$(PY) -m pytest -q -rs -m "not vhosts"; rest=$$?; \
	wait $$hosts; vhosts=$$?; wait $$dropping; dropped=$$?; \
	echo "== the tests on virtual hosts (their own session, run alongside) =="; \
	cat $$log; rm -f $$log; \
	echo "== the network-drop tests (their own session, run alongside) =="; \
	cat $$drops; rm -f $$drops; \
	exit $$(( rest || vhosts || dropped ))

check: lint
	$(PY) -m pytest -q -m "not cluster and not kernel"

bench: $(VENV)/.installed system-deps
	$(PY) bench/run.py

lint: $(VENV)/.installed
	$(PY) -m ruff check mlx_cluster_magic tests bench notebooks docs
	$(PY) -m mypy

docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

notebooks: $(VENV)/.installed
	$(PY) notebooks/run.py --save notebooks/*.ipynb

clean:
	rm -rf $(VENV) build *.egg-info tests/artifacts docs/_build docs/examples
