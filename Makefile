# The two entry points of the project: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,ray,jax,hub,parquet]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Two pytest workers, one per core of a CI machine; a test file stays in one worker
# (module fixtures are built once). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline scripts tests benchmarks

clean:
	rm -rf data/digits cache/*.h5 cache/*.partial models/demo-*
