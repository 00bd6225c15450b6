# The two commands a new user needs: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-readme demo lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[train,serve,dev]'
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
