# gptqlab: `make demo` quantizes and evaluates the embedded model; `make test` runs lint and the tests.
# Both create .venv on first use. TORCH can be overridden, e.g. `make test TORCH='torch==2.11.0'`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: demo test lint install install-test clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: setup.py | $(BIN)/python
	$(PIP) install -q "$(TORCH)"
	echo "$(TORCH)" > $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[triton,plot]"
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m gptqlab.benchmarks.demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# On a CUDA GPU (<= 8 minutes on one H100/H200): correctness, kernel timings, cuBLAS comparison, decode;
# writes benchmarks/results/<gpu-name>/gpu_check.json and .md.
gpu-check: $(VENV)/.installed
	$(BIN)/python -m gptqlab.benchmarks.gpu_check

clean:
	rm -rf $(VENV) out build *.egg-info
