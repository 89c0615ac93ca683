# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project (with a pinned torch) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is tested with; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-cuda lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[experiments,dev]'
	touch $(STAMP)

install: $(STAMP)

# the main job: backprop vs forward gradients on real MNIST digits (offline), a few minutes on a CPU
demo: $(STAMP)
	$(VENV)/bin/fwdgrad compare

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

# the tests marked cuda (GPU variants of tests/test_cuda.py); -rs shows each skip and why (no GPU)
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda -rs -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
