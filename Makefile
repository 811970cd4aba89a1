# The README's commands. Each bootstraps .venv on first use (idempotent: the stamp file is
# rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Parallel test workers; 2 matches the CI machine. Override: make test JOBS=8.
JOBS ?= 2

.PHONY: train test test-all bench bench-train reproduce lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m experiments.main --config experiments/default.py --workdir runs/default

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.attention

bench-train: $(STAMP)
	$(PY) -m experiments.benchmarks.train

# The README's reproductions (experiments/reproductions/): SEEDS=3 for mean +- std.
SEEDS ?= 1
reproduce: $(STAMP)
	$(PY) -m experiments.reproduce --seeds $(SEEDS) --workdir runs/reproduce

lint: $(STAMP)
	$(PY) -m ruff check attn experiments launch tests

clean:
	rm -rf $(VENV) runs
