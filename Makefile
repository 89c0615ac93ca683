# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project (with a pinned torch) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is tested with; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-cuda lint docs results install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[experiments,dev,docs]'
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

# the documentation site (mkdocs.yml, pages in docs/*.md) into site/; fails on any warning
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# every table and figure of the README and the site, into docs/results/ (about 3 hours on 2 CPU cores;
# refuses to start on busy cores). One area: make results AREAS=speed; the list: python docs/results.py --list
results: $(STAMP)
	$(PY) docs/results.py $(AREAS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache site
