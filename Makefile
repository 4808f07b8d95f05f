# Two commands on a fresh machine: `make demo` (set up, run the miniature Entezari et al.
# study locally) and `make test` (set up, lint, check the compiled pipelines, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint compile check-compiled services-up services-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/upstream run study --local studies/entezari-mini.yaml

lint: setup
	$(BIN)/ruff check src components pipelines tests benchmarks

compile: setup
	$(BIN)/upstream compile

check-compiled: setup
	$(BIN)/upstream compile --check

# The test files run on TEST_WORKERS pytest-xdist workers (default 2, this project's machine's
# cores); each file stays on one worker, so its module fixtures start once.
TEST_WORKERS ?= 2

test: lint check-compiled
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

services-up: setup
	$(BIN)/upstream services up

services-down: setup
	$(BIN)/upstream services down

clean:
	rm -rf $(VENV) build *.egg-info
