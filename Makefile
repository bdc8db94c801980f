# Set-up and entry points. On a fresh machine these two commands do everything:
#   make run    # create .venv, install fedquant, run `fedquant run` on the embedded data
#   make test   # create .venv, install fedquant + test tools, run the test suite
# `make test-fast` skips the tests marked slow. `pip install fedquant` alone installs the
# codec and aggregation (numpy, numba); make installs every extra (sim, flower, flower-sim, dev).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test test-fast lint bench install

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[sim,flower,flower-sim,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fedquant run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/fedquant bench $(ARGS)
