# The two commands a new user needs: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: venv datasets test test-readme demo lint format bench clean wheelhouse gpu-data gpu-bundle gpu-check gpu-check-dry-run

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[train,serve,dev,onnx,ray]'
	touch $(STAMP)

# Debian's Fashion-MNIST (the tests, `make demo DATASET=fashion-mnist`, the README's Fashion-MNIST
# steps). Installed with apt-get as root (or with sudo); where neither works, the steps that need it
# are skipped with that reason and everything else still runs.
datasets:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "warning: could not install dataset-fashion-mnist; what needs it is skipped"; \
	fi

# The suite on PYTEST_WORKERS processes (pytest-xdist), one test module at a time per worker (the
# README runner's steps and the Ray tests share a module fixture), longest modules first
# (tests/conftest.py: LONGEST_FIRST; xdist would otherwise order modules by their test count).
# PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2
test: venv datasets
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Only the README runner (tests/test_readme.py, part of make test): every command and snippet of
# README.md, in order, in a copy of the checkout.
test-readme: venv datasets
	$(PY) -m pytest -q -rs -m readme

demo: venv $(if $(filter fashion-mnist,$(DATASET)),datasets)
	$(PY) -m training.demo $(if $(RETRAIN),--retrain) $(if $(DATASET),--dataset $(DATASET)) $(if $(PORT),--port $(PORT))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# GPU verification (bench/gpu_check.py). Here: `make gpu-bundle` writes the git-ignored .whl/ (wheels
# of what a GPU machine without registry access lacks) and .gpu-data/fashion-mnist/, and prints
# their size. There: `make gpu-check` (plain python3, no venv) installs the missing wheels and runs
# every stage in under nine minutes.
GPU_PYTHON ?= python3

wheelhouse: venv
	$(PY) bench/gpu_check.py --download-wheels --wheelhouse .whl

gpu-data:
	mkdir -p .gpu-data/fashion-mnist
	cp $(FASHION_MNIST)/*-ubyte.gz .gpu-data/fashion-mnist/

gpu-bundle: wheelhouse gpu-data
	du -sh --apparent-size .whl .gpu-data
	du -ch --apparent-size .whl .gpu-data | tail -1

gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

gpu-check-dry-run: venv
	$(PY) bench/gpu_check.py --dry-run
