# The two commands a new user needs: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-readme demo lint format bench clean wheelhouse gpu-data gpu-bundle gpu-check gpu-check-dry-run

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[train,serve,dev,onnx,ray]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

# Only the README runner (tests/test_readme.py, part of make test): every command and snippet of
# README.md, in order, in a copy of the checkout.
test-readme: venv
	$(PY) -m pytest -q -rs -m readme

demo: venv
	$(PY) -m training.demo $(if $(RETRAIN),--retrain) $(if $(DATASET),--dataset $(DATASET))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

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
